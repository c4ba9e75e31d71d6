"""The offline demo's stand-in for GPT-2: a small GPT-2-shaped model, pretrained briefly as a plain LM.

LoRA adapts a *pretrained* model (paper section 4): on a random frozen base it learns next to nothing. With no
hub here, the demo first builds a small GPT-2 (the real GPT-2 tokenizer, vocab 50,257) and pretrains it on
in-domain text, the references of the sample's training split without their MRs, as a stand-in for GPT-2's
web-text pretraining. Each text is "<|endoftext|> reference<|endoftext|>", the layout of the fine-tuning
completion, so the base writes fluent restaurant sentences but knows nothing of MRs.

Not a DVC stage: its output is a local model directory that the `download` stage copies like any local GPT-2
(`model.name: <dir>`). With a hub model id nothing here runs.

    python -m stages.tiny_base --train data/sample/trainset.csv --tokenizer data/gpt2/tokenizer.json --out base
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from stages import cli, runtime
from stages.e2e import DataError, read_e2e_csv
from stages.outputs import atomic_dir
from stages.gpt2 import EOS, collate, load_tokenizer


def lm_examples(refs: list[str], tok) -> list[dict]:
    # n_context=1: the leading <|endoftext|> is input only, every later token is a target.
    return [{"input_ids": [EOS] + tok.encode(" " + r) + [EOS], "n_context": 1} for r in refs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="E2E CSV whose references are the pretraining text")
    ap.add_argument("--tokenizer", required=True, help="GPT-2 tokenizer.json (copied into the model)")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runtime.keep_freed_memory()

    refs = [ref for _, ref in read_e2e_csv(args.train)]
    if not refs:
        raise DataError(f"{args.train}: no references to pretrain on")
    tok = load_tokenizer(args.tokenizer)
    torch.manual_seed(args.seed)
    # `pretraining` travels in config.json (the download stage copies it) for the report to name.
    pretraining = (f"{args.epochs:g} epochs of plain language modelling on the {len(refs)} references of the "
                   "sample's training split, without their MRs (no MR syntax, no test text; stages/tiny_base.py).")
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=EOS, eos_token_id=EOS, pretraining=pretraining)
    model = GPT2LMHeadModel(config)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        targs = TrainingArguments(
            output_dir=scratch, seed=args.seed, num_train_epochs=args.epochs, learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size, lr_scheduler_type="linear", warmup_steps=0.05,
            weight_decay=0.01, logging_steps=50, save_strategy="no", report_to="none",
            remove_unused_columns=False, disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning without a GPU only warns
        )
        trainer = Trainer(model=model, args=targs, train_dataset=lm_examples(refs, tok), data_collator=collate)
        trainer.train()
    with atomic_dir(args.out) as out:
        model.save_pretrained(out, safe_serialization=True)
        shutil.copyfile(args.tokenizer, out / "tokenizer.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny_base: {n:,}-parameter GPT-2 ({args.layers} layers, width {args.width}) pretrained on "
          f"{len(refs)} references in {time.perf_counter() - start:.0f} s -> {args.out}", file=sys.stderr)

    return 0


if __name__ == "__main__":
    sys.exit(cli.run("tiny_base", main))
