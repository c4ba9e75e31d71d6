"""Li & Liang's (2021) E2E input layout and [PAD] token, as their fine-tuning code has them (the FT row's recipe).

Source: XiangLi1999/PrefixTuning at 6519d30e69b15a180f23e2cd41b766d3f62b8e82; `tf/` is their transformers 3.2 fork.
- Reading (tf/data/datasets/language_modeling.py lines 391-396): every non-blank line split at `||`, neither side
  stripped, so a reference keeps the trailing space of the LoRA authors' files (the same files: same git blobs).
  Where their reader silently drops a line without exactly one `||`, ours has already refused it (protocols.py).
- Training text (line 401): " " + MR + " <|endoftext|> " + reference + " <|endoftext|>"; labels -100 up to and
  including the first <|endoftext|> (lines 433-438): the loss covers the reference, its trailing spaces, the EOS.
- Prompt (gpt2/run_generation.py lines 150-165): " " + MR + " <|endoftext|>", MR from line.strip().split('||')[0],
  one per distinct MR in order of first appearance: the same MRs, in the same order, as the authors' grouping.
- [PAD] (run_language_modeling.py lines 655-657): added to the vocabulary as id 50257; its embedding row (tied to the
  output layer) drawn from N(0, 0.02) (tf/modeling_utils.py lines 632-637). It is never a label, but it is one
  more logit in every softmax, and a fine-tuned model may in principle emit it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from stages.lib.e2e import DataError, read_text
from stages.lib.gpt2 import EOS

EOS_TEXT = "<|endoftext|>"
PAD_TEXT, PAD = "[PAD]", 50257
PAD_SEED = 0  # the [PAD] row comes from its own generator: a frozen base (LoRA) rebuilds the same row to decode


def read_rows(path: Path, checked_rows: int) -> list[tuple[str, str]]:
    """(MR, reference) of each non-blank line of an authors' text file, unstripped, as their reader has them.
    `checked_rows`: how many rows the protocol's reader accepted from the same file (it has checked every line)."""
    lines = [line for line in read_text(path).splitlines() if line and not line.isspace()]
    rows = [tuple(line.split("||")) for line in lines]
    if len(rows) != checked_rows or any(len(r) != 2 for r in rows):
        raise DataError(f"{path}: {len(rows)} non-blank lines, {checked_rows} rows read: not one (MR, reference) "
                        "pair per line")
    return rows


def training_text(mr: str, ref: str) -> str:
    return f" {mr} {EOS_TEXT} {ref} {EOS_TEXT}"


def prompt_text(mr: str) -> str:
    return f" {mr} {EOS_TEXT}"


def encode(tok, rows: list[tuple[str, str]]) -> dict:
    """input_ids and n_context (the first <|endoftext|> and everything before it: not learned) per row."""
    ids = tok([training_text(mr, ref) for mr, ref in rows])["input_ids"]
    return {"input_ids": ids, "n_context": [x.index(EOS) + 1 for x in ids]}


def encode_prompts(tok, mrs: list[str]) -> list[list[int]]:
    return tok([prompt_text(mr) for mr in mrs])["input_ids"]


def add_pad_row(model) -> None:
    """GPT-2's vocabulary grown by [PAD] (id 50257) as their run_language_modeling.py grows it: one row from
    N(0, 0.02), the same row every time (PAD_SEED), in the tied input and output embedding."""
    if model.config.vocab_size != PAD:
        raise ValueError(f"expected GPT-2's {PAD}-token vocabulary, got {model.config.vocab_size}")
    model.resize_token_embeddings(PAD + 1, mean_resizing=False)
    row = torch.empty(model.config.n_embd).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(PAD_SEED))
    with torch.no_grad():
        model.get_input_embeddings().weight[PAD] = row.to(model.get_input_embeddings().weight)


def add_pad_token(tok):
    """The tokenizer with [PAD] as id 50257, so that decoding a generated [PAD] gives their text."""
    tok.add_special_tokens({"additional_special_tokens": [PAD_TEXT]})
    if tok.convert_tokens_to_ids(PAD_TEXT) != PAD:
        raise ValueError(f"{PAD_TEXT} got id {tok.convert_tokens_to_ids(PAD_TEXT)}, expected {PAD}")
    return tok
