"""The offline demo's stand-in for GPT-2: a small GPT-2-shaped model, pretrained briefly to read its context.

LoRA adapts a *pretrained* model (paper section 4): a low-rank update only re-points skills the base already has.
GPT-2 Medium comes to E2E able to read and copy from its context; a base pretrained on references alone cannot,
and then a rank-4 update learns the references' style but not to follow the MR (issue 11). With no hub here,
the demo builds a small GPT-2 (the real GPT-2 tokenizer, vocab 50,257) and pretrains it on two kinds of text,
both made only from the *references* of the sample's training split (never an MR, never test text):

- plain LM: "<|endoftext|> reference<|endoftext|>", the layout of the fine-tuning completion;
- keywords to text: "<|endoftext|>(city centre) (Wrestlers) (coffee shop)<|endoftext|> reference<|endoftext|>":
  a few word spans of the reference, shuffled, in one of several bracket/list styles (none is E2E's
  `key[value]`), then the reference. In a share of the examples the restaurant's name in the reference (found
  with the training MR's name/near value) is replaced by a made-up name of random capitalised GPT-2 vocabulary
  words, so copying the span from the context is the only way to predict it.

The loss covers what follows the last <|endoftext|> of the context (the reference and its EOS). Logits are
computed at those positions only, and (by default, `--softmax corpus`) only over the tokens that the pretraining
targets contain (a few thousand): the 50,257-wide output layer is most of the cost at this size, about 4x less
this way. The other rows of the tied embedding stay at their initialisation until fine-tuning.

Not a DVC stage: its output is a local model directory that the `download` stage copies like any local GPT-2
(`model.name: <dir>`). With a hub model id nothing here runs.

    python -m stages.tiny_base --train data/sample/trainset.csv --tokenizer data/gpt2/tokenizer.json --out base
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from stages import runtime
from stages.e2e import DataError, parse_mr, read_e2e_csv
from stages.outputs import atomic_dir
from stages.gpt2 import EOS, collate, load_tokenizer

# (open, close, separator) for the keyword list; deliberately not E2E's `key[value], ...`.
STYLES = [("(", ")", " "), ("<", ">", " "), ("{", "}", ", "), ("", "", " | "), ("", "", "; "), ("'", "'", ", "),
          ("", "", " / "), ("* ", "", "\n")]
_STOP = set("a an the is it its in of and or to for at on by with near which that this there are has have be "
            "not but as you can their they located called named serves serving offers".split())


def name_words(tok) -> list[str]:
    """Capitalised whole-word GPT-2 tokens ("ĠWord"): the pieces of made-up restaurant names."""
    return sorted(t[1:] for t in tok.get_vocab() if re.fullmatch(r"Ġ[A-Z][a-z]{3,9}", t))


def fake_name(rng: random.Random, words: list[str]) -> str:
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(words)
    if kind < 0.7:
        return "The " + rng.choice(words)
    return rng.choice(words) + " " + rng.choice(words)


def swap_names(ref: str, names: list[str], rng: random.Random, words: list[str]) -> tuple[str, list[str]]:
    """Replace each given name occurring in `ref` by a made-up one; returns the text and the names it now holds."""
    held = []
    for name in names:
        if name and name in ref:
            new = fake_name(rng, words)
            ref = ref.replace(name, new)
            held.append(new)
    return ref, held


def keywords(ref: str, must: list[str], rng: random.Random) -> list[str]:
    """2-6 random spans of 1-3 words of `ref` (not all stop words), plus the `must` spans, shuffled, distinct."""
    words = [w.strip(".,;:!?\"()") for w in ref.split()]
    words = [w for w in words if w]
    spans = list(must)
    for _ in range(rng.randint(2, 6)):
        if not words:
            break
        n = rng.randint(1, 3)
        i = rng.randrange(max(1, len(words) - n + 1))
        span = words[i:i + n]
        if any(w.lower() not in _STOP for w in span):
            spans.append(" ".join(span))
    rng.shuffle(spans)
    return list(dict.fromkeys(spans))


def examples(rows: list[tuple[str, str]], tok, rng: random.Random, words: list[str], p_lm: float,
             p_swap: float) -> list[dict]:
    """One pass over the references: a plain-LM or a keywords-to-text example each, freshly drawn."""
    out = []
    for mr, ref in rows:
        slots = dict(parse_mr(mr)) if mr else {}
        held = []
        if rng.random() < p_swap:
            ref, held = swap_names(ref, [slots.get("name", ""), slots.get("near", "")], rng, words)
        target = tok.encode(" " + ref) + [EOS]
        if rng.random() < p_lm:
            out.append({"input_ids": [EOS] + target, "n_context": 1})
            continue
        opn, cls, sep = rng.choice(STYLES)
        spans = keywords(ref, held, rng)
        # Half with a leading <|endoftext|>, half without: fine-tuning contexts start with the MR's first token.
        lead = [EOS] if rng.random() < 0.5 else []
        context = lead + tok.encode(sep.join(f"{opn}{s}{cls}" for s in spans)) + [EOS]
        out.append({"input_ids": context + target, "n_context": len(context)})
    return out


def describe(args, n_refs: int) -> str:
    return (f"{args.epochs:g} passes over the {n_refs} references of the sample's training split (no MRs, no test "
            f"text), each reference drawn as plain LM text ({args.plain_lm:.0%}) or as a keywords-to-text example "
            f"(a shuffled list of its own word spans, then the reference); {args.swap_names:.0%} of them with the "
            "restaurant names replaced by made-up ones (stages/tiny_base.py).")


def loss_on_targets(model: GPT2LMHeadModel, batch: dict, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions only: (N, d) hidden states -> (N, V) logits, V = 50,257,
    or only the rows of `vocab` (sorted token ids: the pretraining text's own vocabulary, a softmax ~10x cheaper)."""
    hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    hidden, labels = hidden[:, :-1][keep], labels[keep]
    if vocab is None:
        return F.cross_entropy(model.lm_head(hidden), labels)
    weight = model.lm_head.weight[vocab]  # (V', d): the tied embedding's rows
    return F.cross_entropy(hidden @ weight.T, torch.searchsorted(vocab, labels))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="E2E CSV whose references are the pretraining text")
    ap.add_argument("--tokenizer", required=True, help="GPT-2 tokenizer.json (copied into the model)")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=6, help="passes over the references (each freshly drawn)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--plain-lm", type=float, default=0.25, help="share of plain-LM examples (rest: keywords)")
    ap.add_argument("--swap-names", type=float, default=0.7, help="share of examples with made-up names")
    ap.add_argument("--softmax", choices=("full", "corpus"), default="corpus",
                    help="corpus: normalise over the pretraining text's own tokens only (faster)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runtime.keep_freed_memory()

    rows = read_e2e_csv(args.train)
    if not rows:
        raise DataError(f"{args.train}: no references to pretrain on")
    tok = load_tokenizer(args.tokenizer)
    words = name_words(tok)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    # `pretraining` travels in config.json (the download stage copies it) for the report to name.
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=EOS, eos_token_id=EOS,
                        pretraining=describe(args, len(rows)))
    model = GPT2LMHeadModel(config)

    # The schedule: `epochs` passes, the last one cut short for fractional epochs; linear decay, 5% warm-up.
    passes = []
    left = args.epochs
    while left > 0:
        order = rng.sample(rows, len(rows))
        passes.append(examples(order[:max(1, round(len(rows) * min(1.0, left)))], tok, rng, words,
                               args.plain_lm, args.swap_names))
        left -= 1
    data = [ex for p in passes for ex in p]
    vocab = None
    if args.softmax == "corpus":
        vocab = torch.tensor(sorted({t for ex in data for t in ex["input_ids"][ex["n_context"]:]}))
    batches = [data[i:i + args.batch_size] for i in range(0, len(data), args.batch_size)]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, len(batches) // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (len(batches) - s) / max(1, len(batches) - warm))))
    start = time.perf_counter()
    model.train()
    for step, batch in enumerate(batches):
        loss = loss_on_targets(model, collate(batch), vocab)
        if not torch.isfinite(loss):
            raise ValueError(f"non-finite pretraining loss at step {step}")
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == len(batches) - 1:
            print(f"tiny_base: step {step + 1}/{len(batches)} loss {loss.item():.3f}", file=sys.stderr)
    with atomic_dir(args.out) as out:
        model.save_pretrained(out, safe_serialization=True)
        shutil.copyfile(args.tokenizer, out / "tokenizer.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny_base: {n:,}-parameter GPT-2 ({args.layers} layers, width {args.width}) pretrained on "
          f"{len(data)} examples ({'full' if vocab is None else len(vocab)} softmax) from {len(rows)} references in {time.perf_counter() - start:.0f} s -> {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (DataError, ValueError) as e:
        sys.exit(f"tiny_base: error: {e}")
