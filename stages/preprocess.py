"""preprocess: the protocol's E2E files -> token ids for training (train, validation) and one context per test MR,
in every input layout a recipe may name (`<recipe>.layout`), each in its own folder: a recipe switch reruns none.

- `paper` follows microsoft/LoRA's examples/NLG (gpt2_encode.py with --add_bos --add_eos): the MR is the context,
  then the separator token <|endoftext|>, then " " + reference as the completion, then EOS.
- `equals` is `MR = reference`: context "MR =", completion " reference", EOS.
- `li-liang` is Li & Liang's " MR <|endoftext|> reference <|endoftext|>", their reader's text (stages/lib/li_liang.py).
The loss covers the completion and its EOS only (context masked, paper section 5.1's conditional LM objective);
`n_context` records where the completion starts. The EOS label is kept so the model learns to stop.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets

from stages.lib import cli, li_liang
from stages.lib import params as P
from stages.lib.e2e import DataError
from stages.lib.gpt2 import load_tokenizer
from stages.lib.outputs import atomic_dir, check_writable, exclusive
from stages.lib.protocols import PROTOCOLS


def config(p: P.Params) -> dict:
    return {"protocol": p.protocol, "max_length": p.preprocess.max_length}


def n_positions(base: Path) -> int:
    """How many positions the base model has (config.json): no example may be longer."""
    path = base / "config.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["n_positions"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: cannot read n_positions ({e!r})") from None


def encode_contexts(tok, mrs: list[str], layout: str) -> list[list[int]]:
    if layout == "paper":
        return [ids + [tok.eos_token_id] for ids in tok(mrs)["input_ids"]]
    if layout == "li-liang":
        return li_liang.encode_prompts(tok, mrs)
    return tok([mr + " =" for mr in mrs])["input_ids"]


def encode_batch(batch: dict, tok, layout: str) -> dict:
    """A datasets.map batch of (mr, ref) -> input_ids (context + " " ref + EOS) and n_context."""
    if layout == "li-liang":
        return li_liang.encode(tok, list(zip(batch["mr"], batch["ref"])))
    contexts = encode_contexts(tok, batch["mr"], layout)
    completions = tok([" " + ref for ref in batch["ref"]])["input_ids"]
    return {"input_ids": [c + r + [tok.eos_token_id] for c, r in zip(contexts, completions)],
            "n_context": [len(c) for c in contexts]}


def check_lengths(lengths: list[int], max_length: int, path: Path, what: str = "data row") -> None:
    for row, n in enumerate(lengths, start=1):
        if n > max_length:
            raise DataError(f"{path}: {what} {row}: {n} tokens > preprocess.max_length={max_length}; raise it "
                            "rather than truncate (truncation would cut the EOS the model must learn)")


def encode_split(rows: list[tuple[str, str]], tok, layout: str) -> datasets.Dataset:
    table = datasets.Dataset.from_dict({"mr": [r[0] for r in rows], "ref": [r[1] for r in rows]})
    # Batched: the tokenizers library encodes a whole batch in Rust. DVC caches the stage's output, so the
    # datasets library's own cache (for file-backed datasets) is not needed: this one lives in memory.
    return table.map(encode_batch, batched=True, batch_size=1000, fn_kwargs={"tok": tok, "layout": layout},
                     remove_columns=["mr", "ref"], new_fingerprint=f"encode-{layout}")


def refs_text(groups: list[tuple[str, list[str]]], path: Path) -> str:
    """The scorers' multi-reference text format: an MR's references on consecutive lines, a blank line between."""
    for mr, refs in groups:
        for ref in refs:
            if "\n" in ref or not ref.strip():
                raise DataError(f"{path}: a reference of MR {mr!r} is empty or spans lines: {ref!r}")
    return "\n\n".join("\n".join(refs) for _, refs in groups) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", required=True, help="download-data's output: the protocol's three files")
    ap.add_argument("--base", required=True, help="download-model's output: tokenizer.json and config.json")
    ap.add_argument("--out", required=True, help="output directory (Arrow datasets train/, validation/, test/; "
                    "test-refs.txt, the test references grouped by MR for the score stage)")
    args = ap.parse_args(argv)
    datasets.disable_progress_bars()

    cfg = config(P.read())
    protocol, max_length = PROTOCOLS[cfg["protocol"]], cfg["max_length"]
    positions = n_positions(Path(args.base))
    if max_length > positions:  # a longer example could not be trained or decoded: say so before any work
        raise P.ParamError(f"preprocess.max_length={max_length} > the base model's {positions} positions "
                           f"({Path(args.base) / 'config.json'})")
    check_writable(args.out)

    raw = Path(args.raw)
    paths = {split: raw / protocol.raw_name(split) for split in protocol.files}
    splits = {split: protocol.read(path) for split, path in paths.items()}  # every file checked before any work
    # Li & Liang's reader keeps what the protocol's strips: the authors' files' trailing spaces.
    unstripped = {split: li_liang.read_rows(paths[split], len(splits[split])) if protocol.name == "authors"
                  else splits[split] for split in ("train", "validation")}
    tok = load_tokenizer(Path(args.base) / "tokenizer.json")
    groups = protocol.group(splits["test"])
    refs = refs_text(groups, paths["test"])
    mrs = [mr for mr, _ in groups]
    encoded = {}
    for layout in P.LAYOUTS:  # every one a recipe may name: a recipe switch reruns no preprocess
        for split in ("train", "validation"):
            rows = unstripped[split] if layout == "li-liang" else splits[split]
            encoded[layout, split] = encode_split(rows, tok, layout)
            check_lengths([len(ids) for ids in encoded[layout, split]["input_ids"]], max_length, paths[split])
        contexts = encode_contexts(tok, mrs, layout)
        # A test context longer than max_length would only fail in generate, after training: fail here.
        check_lengths([len(c) for c in contexts], max_length, paths["test"], what="test MR")
        encoded[layout, "test"] = datasets.Dataset.from_dict(
            {"mr": mrs, "refs": [r for _, r in groups], "context_ids": contexts})

    with exclusive(args.out), atomic_dir(args.out) as out:
        for (layout, split), table in encoded.items():
            table.save_to_disk(str(out / layout / split))
        (out / "test-refs.txt").write_text(refs, encoding="utf-8")
    n = {split: len(encoded["paper", split]) for split in ("train", "validation", "test")}
    print(f"preprocess: protocol={protocol.name}, {n['train']} train / {n['validation']} validation examples, "
          f"{n['test']} test MRs ({len(splits['test'])} references), layouts {', '.join(P.LAYOUTS)} -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("preprocess", main))
