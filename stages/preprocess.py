"""preprocess: E2E CSVs -> token ids for training (train, validation) and one context per test MR.

Input format (`preprocess.format`):
- `paper` (default) follows microsoft/LoRA's examples/NLG (gpt2_encode.py with --add_bos --add_eos): the MR is
  the context, then the separator token <|endoftext|>, then " " + reference as the completion, then EOS.
- `equals` is the seed's `MR = reference` layout: context "MR =", completion " reference", EOS.
The loss covers the completion and its EOS only (context masked, paper section 5.1's conditional LM objective);
`n_context` records where the completion starts. The EOS label is kept so the model learns to stop.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import datasets

from stages.lib import authors_data, cli
from stages.lib import params as P
from stages.lib.e2e import DataError, group_by_mr, parse_mr, read_e2e_csv
from stages.lib.gpt2 import load_tokenizer
from stages.lib.outputs import atomic_dir, check_writable

FORMATS = ("paper", "equals")
PROTOCOLS = ("authors", "e2e")
# download's output names per protocol: the authors' text files, or the official CSVs.
FILES = {"authors": {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"},
         "e2e": {"train": "train.csv", "validation": "dev.csv", "test": "test.csv"}}
KNOWN = ("format", "max_length")


def encode_contexts(tok, mrs: list[str], fmt: str) -> list[list[int]]:
    if fmt == "paper":
        return [ids + [tok.eos_token_id] for ids in tok(mrs)["input_ids"]]
    return tok([mr + " =" for mr in mrs])["input_ids"]


def encode_batch(batch: dict, tok, fmt: str) -> dict:
    """A datasets.map batch of (mr, ref) -> input_ids (context + " " ref + EOS) and n_context."""
    contexts = encode_contexts(tok, batch["mr"], fmt)
    completions = tok([" " + ref for ref in batch["ref"]])["input_ids"]
    return {"input_ids": [c + r + [tok.eos_token_id] for c, r in zip(contexts, completions)],
            "n_context": [len(c) for c in contexts]}


def check_rows(rows: list[tuple[str, str]], path: Path, need_ref: bool = True) -> None:
    """Reject what would otherwise be silently learned or scored wrong: empty splits, MRs, refs, bad MRs."""
    if not rows:
        raise DataError(f"{path}: empty split (no data rows)")
    for i, (mr, ref) in enumerate(rows, start=1):
        where = f"{path}: data row {i} (line {i + 1})"
        try:
            parse_mr(mr)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if need_ref and not ref:
            raise DataError(f"{where}: empty reference")


def check_lengths(lengths: list[int], max_length: int, path: Path, what: str = "data row") -> None:
    for row, n in enumerate(lengths, start=1):
        if n > max_length:
            raise DataError(f"{path}: {what} {row}: {n} tokens > preprocess.max_length={max_length}; raise it "
                            "rather than truncate (truncation would cut the EOS the model must learn)")


def encode_split(rows: list[tuple[str, str]], tok, fmt: str) -> datasets.Dataset:
    table = datasets.Dataset.from_dict({"mr": [r[0] for r in rows], "ref": [r[1] for r in rows]})
    # Batched: the tokenizers library encodes a whole batch in Rust. DVC caches the stage's output, so the
    # datasets library's own cache (for file-backed datasets) is not needed: this one lives in memory.
    return table.map(encode_batch, batched=True, batch_size=1000, fn_kwargs={"tok": tok, "fmt": fmt},
                     remove_columns=["mr", "ref"], new_fingerprint=f"encode-{fmt}")


def read_split(path: Path, protocol: str) -> list[tuple[str, str]]:
    """(MR, reference) rows, validated: the authors' `MR||reference` lines, or an official CSV (MRs parsed)."""
    if protocol == "authors":
        return authors_data.read_authors_file(path)  # checks each line, naming file and line
    rows = read_e2e_csv(path)
    check_rows(rows, path)
    return rows


def test_groups(rows: list[tuple[str, str]], protocol: str) -> list[tuple[str, list[str]]]:
    """One entry per test MR, in order of first appearance, with the references the scorer compares against:
    the authors' cut as gpt2_decode.py does (authors), or the CSV's as the official scorer reads them (e2e)."""
    return authors_data.group_references(rows) if protocol == "authors" else group_by_mr(rows)


def refs_text(groups: list[tuple[str, list[str]]], path: Path) -> str:
    """The scorers' multi-reference text format: an MR's references on consecutive lines, a blank line between."""
    for mr, refs in groups:
        for ref in refs:
            if "\n" in ref or not ref.strip():
                raise DataError(f"{path}: a reference of MR {mr!r} is empty or spans lines: {ref!r}")
    return "\n\n".join("\n".join(refs) for _, refs in groups) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", required=True, help="directory with train.csv, dev.csv, test.csv")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json of the base model")
    ap.add_argument("--out", required=True, help="output directory (Arrow datasets train/, validation/, test/; "
                    "test-refs.txt, the test references grouped by MR for the score stage)")
    args = ap.parse_args(argv)
    datasets.disable_progress_bars()

    params = P.load()
    P.warn_unknown(params, "preprocess", KNOWN)
    protocol = P.choice(params, "protocol", PROTOCOLS)
    fmt = P.choice(params, "preprocess.format", FORMATS)
    max_length = P.number(params, "preprocess.max_length", kind=int, min=8)
    check_writable(args.out)

    raw, files = Path(args.raw), FILES[protocol]
    # Read and validate everything before writing anything.
    splits = {split: read_split(raw / name, protocol) for split, name in files.items()}
    for split, rows in splits.items():
        if not rows:
            raise DataError(f"{raw / files[split]}: empty split (no data rows)")

    tok = load_tokenizer(args.tokenizer)
    encoded = {}
    for split in ("train", "validation"):
        encoded[split] = encode_split(splits[split], tok, fmt)
        check_lengths([len(ids) for ids in encoded[split]["input_ids"]], max_length, raw / files[split])
    groups = test_groups(splits["test"], protocol)
    refs = refs_text(groups, raw / files["test"])
    contexts = encode_contexts(tok, [mr for mr, _ in groups], fmt)
    # A test context longer than max_length would only fail in generate, after training: fail here.
    check_lengths([len(c) for c in contexts], max_length, raw / files["test"], what="test MR")
    encoded["test"] = datasets.Dataset.from_dict(
        {"mr": [mr for mr, _ in groups], "refs": [r for _, r in groups], "context_ids": contexts})

    with atomic_dir(args.out) as out:
        for split, table in encoded.items():
            table.save_to_disk(str(out / split))
        (out / "test-refs.txt").write_text(refs, encoding="utf-8")
    counts = {s: len(v) for s, v in encoded.items()}
    print(f"preprocess: protocol={protocol}, format={fmt}, {counts['train']} train / {counts['validation']} "
          f"validation examples, {counts['test']} test MRs ({len(splits['test'])} references) -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("preprocess", main))
