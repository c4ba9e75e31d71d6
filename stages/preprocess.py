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
import json
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from stages import params as P
from stages.e2e import DataError, group_by_mr, parse_mr, read_e2e_csv
from stages.outputs import atomic_dir

FORMATS = ("paper", "equals")
SPLITS = {"train": "train.csv", "validation": "dev.csv"}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from a tokenizer.json; <|endoftext|> (50256) is both EOS and separator."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def encode_context(tok, mr: str, fmt: str) -> list[int]:
    if fmt == "paper":
        return tok.encode(mr) + [tok.eos_token_id]
    return tok.encode(mr + " =")


def encode_example(tok, mr: str, ref: str, fmt: str) -> dict:
    context = encode_context(tok, mr, fmt)
    completion = tok.encode(" " + ref) + [tok.eos_token_id]
    return {"input_ids": context + completion, "n_context": len(context)}


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


def check_length(example: dict, max_length: int, path: Path, row: int) -> None:
    n = len(example["input_ids"])
    if n > max_length:
        raise DataError(f"{path}: data row {row}: {n} tokens > preprocess.max_length={max_length}; "
                        "raise it rather than truncate (truncation would cut the EOS the model must learn)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", required=True, help="directory with train.csv, dev.csv, test.csv")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json of the base model")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    params = P.load()
    fmt = P.choice(params, "preprocess.format", FORMATS)
    max_length = P.number(params, "preprocess.max_length", kind=int, min=8)

    raw = Path(args.raw)
    # Read and validate everything before writing anything.
    splits = {}
    for split, name in {**SPLITS, "test": "test.csv"}.items():
        rows = read_e2e_csv(raw / name)
        check_rows(rows, raw / name)
        splits[split] = rows

    tok = load_tokenizer(args.tokenizer)
    encoded = {}
    for split in SPLITS:
        path = raw / SPLITS[split]
        encoded[split] = [encode_example(tok, mr, ref, fmt) for mr, ref in splits[split]]
        for i, ex in enumerate(encoded[split], start=1):
            check_length(ex, max_length, path, i)
    test = [{"mr": mr, "refs": refs, "context_ids": encode_context(tok, mr, fmt)}
            for mr, refs in group_by_mr(splits["test"])]

    with atomic_dir(args.out) as out:
        for split, examples in {**encoded, "test": test}.items():
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for ex in examples:
                    f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    counts = {s: len(v) for s, v in encoded.items()}
    print(f"preprocess: format={fmt}, {counts['train']} train / {counts['validation']} validation examples, "
          f"{len(test)} test MRs ({len(splits['test'])} references) -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (DataError, P.ParamError) as e:
        sys.exit(f"preprocess: error: {e}")
