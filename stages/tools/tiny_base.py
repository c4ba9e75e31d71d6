"""The offline demo's stand-in for GPT-2: a small GPT-2-shaped model, taught to copy, then pretrained as an LM.

LoRA adapts a *pretrained* model (paper section 4): a low-rank update only re-points skills the base already has.
GPT-2 Medium comes to E2E able to read and copy from its context; a base pretrained on references alone cannot,
and then a rank-4 update learns the references' style but not to follow the MR (issue 11, benchmarks/
DEMO_NOTES.md). With no hub here, the demo builds a small GPT-2 (the real GPT-2 tokenizer, vocab 50,257) and
pretrains it in two phases, on nothing from the MRs and nothing from the test split:

1. copy: "<|endoftext|> s <|endoftext|> s", s a span of random GPT-2 token ids (any but EOS), loss on the repeat
   only, the setting in which small transformers learn to copy within a few hundred steps, where natural text
   alone never taught it (DEMO_NOTES attempts C-E). The softmax is sampled: the batch's own tokens plus a few
   thousand random ids, so every embedding row takes part and copying is not tied to a favoured few tokens.
   With one span length the model learns mostly a positional copy ("the token length + 1 places back"), not a
   length-independent induction head, which forms far later (DEMO_NOTES probes H3, H4).
2. language modelling on the references of the sample's training split, without their MRs:
   "<|endoftext|> reference<|endoftext|>" (the layout of the fine-tuning completion), full softmax, with a small,
   down-weighted copy batch at every step: without it the LM phase erases the copy skill (attempt H, variant A).

At the end a gate measures teacher-forced copy accuracy on fresh random-token spans (argmax over the full
vocabulary): a base below `--min-copy-accuracy` fails loudly (exit 1, nothing written) instead of being shipped.

Not a DVC stage: its output is a local model directory that the `download` stage copies like any local GPT-2
(`model.source: <dir>`). With the hub pin (models/gpt2-medium.yaml) nothing here runs.

    python -m stages.tools.tiny_base --train data/sample/trainset.csv --tokenizer data/gpt2/tokenizer.json --out base
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from stages.lib import cli, runtime
from stages.lib.e2e import DataError, read_e2e_csv
from stages.lib.gpt2 import EOS, collate, load_tokenizer
from stages.lib.outputs import atomic_dir


def copy_candidates(batch: dict, vocab_size: int, negatives: int, gen: torch.Generator) -> torch.Tensor:
    """The copy phase's softmax rows: the batch's own tokens plus `negatives` random ids, sorted (a sampled
    softmax: every token of the vocabulary takes part now and then, none is trained far more than the rest)."""
    extra = torch.randint(vocab_size, (negatives,), generator=gen)
    return torch.cat([batch["input_ids"].flatten(), extra]).unique()


def copy_batch(tokens: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> dict:
    """`batch` sequences "<|endoftext|> s <|endoftext|> s", s `length` tokens drawn from `tokens`:
    input_ids (batch, 2 * length + 2), labels -100 everywhere but the repeat (the last `length` positions)."""
    span = tokens[torch.randint(len(tokens), (batch, length), generator=gen)]
    eos = torch.full((batch, 1), EOS)
    ids = torch.cat([eos, span, eos, span], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, length + 2:] = span
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_on_targets(model: GPT2LMHeadModel, batch: dict, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions only: (N, d) hidden states -> (N, V) logits over the full
    vocabulary, or over the rows of `vocab` only (sorted token ids holding every label)."""
    hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    hidden, labels = hidden[:, :-1][keep], labels[keep]
    if vocab is None:
        return F.cross_entropy(model.lm_head(hidden), labels)
    return F.cross_entropy(hidden @ model.lm_head.weight[vocab].T, torch.searchsorted(vocab, labels))


@torch.no_grad()
def copy_accuracy(model: GPT2LMHeadModel, tokens: torch.Tensor, gen: torch.Generator, n: int = 64,
                  length: int = 8) -> float:
    """Share of the repeat's tokens that the model predicts (argmax over the full vocabulary, teacher-forced)."""
    model.eval()
    batch = copy_batch(tokens, n, length, gen)
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    model.train()
    return (logits[keep].argmax(-1) == labels[keep]).float().mean().item()


def schedule(total: int, warmup: int, decay: bool):
    """Linear warm-up over `warmup` steps, then constant or a cosine decay to 10% (multiplies the base rate)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * done)) if decay else 1.0
    return factor


def train_phase(model, losses, lr: float, warmup: int, name: str, decay: bool, clip: float) -> float:
    """AdamW over `losses` (callables, one per step, each returning its batch's loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(len(losses), warmup, decay))
    loss = torch.tensor(float("nan"))
    for step, make_loss in enumerate(losses):
        loss = make_loss()
        if not torch.isfinite(loss):
            raise cli.RunError(f"non-finite loss in the {name} phase at step {step + 1}")
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == len(losses) - 1:
            print(f"tiny_base: {name} step {step + 1}/{len(losses)} loss {loss.item():.3f}", file=sys.stderr)
    return loss.item()


def describe(args, n_refs: int) -> str:
    return (f"{args.copy_steps} steps of copying spans of {args.copy_length} random GPT-2 tokens, then "
            f"{args.epochs:g} epochs of plain language modelling on the {n_refs} references of the sample's "
            f"training split, without their MRs, with {args.copy_mix} copy sequences per step (no MR syntax, no "
            "test text; stages/tools/tiny_base.py).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="E2E CSV whose references are the pretraining text")
    ap.add_argument("--tokenizer", required=True, help="GPT-2 tokenizer.json (copied into the model)")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--copy-steps", type=int, default=250, help="steps of the copy phase (batches of 32)")
    ap.add_argument("--copy-length", type=int, default=8, help="tokens per copied span")
    ap.add_argument("--copy-negatives", type=int, default=2000, help="random extra rows of the copy softmax")
    ap.add_argument("--copy-lr", type=float, default=2e-3)
    ap.add_argument("--copy-mix", type=int, default=4, help="copy sequences added to each LM step (0: none)")
    ap.add_argument("--copy-weight", type=float, default=0.2, help="weight of their loss beside the LM loss")
    ap.add_argument("--min-copy-accuracy", type=float, default=0.5,
                    help="fail unless the final base copies at least this share of random-token spans")
    ap.add_argument("--epochs", type=float, default=3, help="passes over the references in the LM phase")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--softmax", choices=("full", "corpus"), default="full",
                    help="LM phase: normalise over the whole vocabulary or over the references' tokens only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runtime.keep_freed_memory()

    refs = [ref for _, ref in read_e2e_csv(args.train)]
    if not refs:
        raise DataError(f"{args.train}: no references to pretrain on")
    tok = load_tokenizer(args.tokenizer)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.arange(EOS)  # every id but <|endoftext|>, GPT-2's last
    # `pretraining` travels in config.json (the download stage copies it) for the report to name.
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=EOS, eos_token_id=EOS, pretraining=describe(args, len(refs)))
    model = GPT2LMHeadModel(config)
    model.train()
    start = time.perf_counter()

    def copy_loss(n: int) -> torch.Tensor:
        batch = copy_batch(tokens, n, args.copy_length, gen)
        return loss_on_targets(model, batch, copy_candidates(batch, len(tok), args.copy_negatives, gen))
    train_phase(model, [lambda: copy_loss(32)] * args.copy_steps, args.copy_lr, 10, "copy", decay=False, clip=0)
    after_copy = copy_accuracy(model, tokens, torch.Generator().manual_seed(args.seed + 1))
    print(f"tiny_base: copy phase {time.perf_counter() - start:.0f} s", file=sys.stderr)

    # LM phase: the references in a seeded random order, `epochs` passes (the last cut short if fractional).
    examples = [{"input_ids": [EOS] + tok.encode(" " + r) + [EOS], "n_context": 1} for r in refs]
    vocab = None
    if args.softmax == "corpus":
        vocab = torch.tensor(sorted({t for ex in examples for t in ex["input_ids"]}))
    order = []
    while len(order) < args.epochs * len(examples):
        order += torch.randperm(len(examples), generator=gen).tolist()
    order = order[:max(1, round(args.epochs * len(examples)))]
    batches = [[examples[i] for i in order[j:j + args.batch_size]] for j in range(0, len(order), args.batch_size)]

    def lm_loss(batch: list[dict]) -> torch.Tensor:
        lm = loss_on_targets(model, collate(batch), vocab)
        return lm + args.copy_weight * copy_loss(args.copy_mix) if args.copy_mix else lm
    train_phase(model, [lambda b=b: lm_loss(b) for b in batches], args.lr, max(1, len(batches) // 20), "lm",
                decay=True, clip=1.0)
    final = copy_accuracy(model, tokens, torch.Generator().manual_seed(args.seed + 1))
    print(f"tiny_base: copy accuracy on random-token spans {after_copy:.2f} after the copy phase, {final:.2f} at "
          f"the end (gate {args.min_copy_accuracy})", file=sys.stderr)
    if not final >= args.min_copy_accuracy:
        raise cli.RunError(f"the base copies {final:.2f} of random-token spans < --min-copy-accuracy "
                           f"{args.min_copy_accuracy}: not shipping a base whose context LoRA cannot point it at")

    with atomic_dir(args.out) as out:
        model.save_pretrained(out, safe_serialization=True)
        shutil.copyfile(args.tokenizer, out / "tokenizer.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny_base: {n:,}-parameter GPT-2 ({args.layers} layers, width {args.width}) pretrained in "
          f"{time.perf_counter() - start:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("tiny_base", main))
