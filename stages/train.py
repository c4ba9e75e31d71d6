"""train: fine-tune the pretrained model on E2E, with LoRA (`--method lora`) or all weights (`--method full`).

Both methods share one loop, the paper's Table 11 protocol for GPT-2 Medium on E2E: AdamW, linear schedule
with warm-up, label smoothing, conditional LM loss on the completion only. Runs unchanged on one CPU, one GPU or
several (`accelerate launch -m stages.train ...` / `torchrun -m stages.train ...`): the transformers Trainer does
the distribution, and only the main process writes outputs.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

from stages import lora
from stages import params as P
from stages import runtime
from stages.e2e import DataError
from stages.outputs import atomic_dir, write_json

EOS = 50256  # GPT-2's <|endoftext|>, also its padding id: padding is told apart by length, never by id.
TARGETS = ("q", "k", "v", "o")


def read_config(params: dict, method: str) -> dict:
    """All knobs this run uses, validated before the model is loaded (errors name the parameter)."""
    cfg = {
        "seed": P.number(params, "train.seed", kind=int, min=0),
        "epochs": P.number(params, "train.epochs", min=0, min_inclusive=False),
        "batch_size": P.number(params, "train.batch_size", kind=int, min=1),
        "label_smoothing": P.number(params, "train.label_smoothing", min=0, max=1, max_inclusive=False),
        "warmup_steps": P.number(params, "train.warmup_steps", kind=int, min=0),
        "max_grad_norm": P.number(params, "train.max_grad_norm", min=0),
        "lr": P.number(params, f"{method}.lr", min=0, min_inclusive=False),
        "weight_decay": P.number(params, f"{method}.weight_decay", min=0),
    }
    if method == "lora":
        cfg["rank"] = P.number(params, "lora.rank", kind=int, min=1)
        cfg["alpha"] = P.number(params, "lora.alpha", min=0, min_inclusive=False)
        cfg["dropout"] = P.number(params, "lora.dropout", min=0, max=1, max_inclusive=False)
        targets = P.get(params, "lora.targets")
        if not isinstance(targets, list) or not targets or any(t not in TARGETS for t in targets):
            raise P.ParamError(f"lora.targets must be a non-empty list drawn from {list(TARGETS)}, got {targets!r}")
        cfg["targets"] = targets
    return cfg


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def collate(examples: list[dict]) -> dict:
    """Right-pad a batch. Labels: -100 on the context and on padding (found by length), so the completion's
    final EOS keeps its label: masking by `id == pad_id` would drop it and the model would never learn to stop."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), EOS, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n, c = len(e["input_ids"]), e["n_context"]
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, c:n] = ids[i, c:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def base_identity(base_dir: Path) -> str:
    """The pretrained model's identity, stamped into the adapter so it is never applied to another base."""
    ident = json.loads((base_dir / "identity.json").read_text())
    return json.dumps(ident, sort_keys=True)


def peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"  # ru_maxrss is in KiB


def build_model(base_dir: Path, method: str, cfg: dict) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel.from_pretrained(base_dir, use_safetensors=True)
    if method == "lora":
        lora.add_lora(model, rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg["dropout"],
                      targets=tuple(cfg["targets"]))
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("lora", "full"), required=True)
    ap.add_argument("--data", required=True, help="preprocess output (train.jsonl, validation.jsonl)")
    ap.add_argument("--base", required=True, help="pretrained model directory (download output)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    runtime.keep_freed_memory()

    cfg = read_config(P.load(), args.method)
    data, base = Path(args.data), Path(args.base)
    train_set, eval_set = read_jsonl(data / "train.jsonl"), read_jsonl(data / "validation.jsonl")

    torch.manual_seed(cfg["seed"])  # LoRA's A init happens in build_model: seed it too
    model = build_model(base, args.method, cfg)
    trainable = lora.count_trainable(model)

    with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output_dir; we save nothing there
        targs = TrainingArguments(
            output_dir=scratch, seed=cfg["seed"], num_train_epochs=cfg["epochs"],
            per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["batch_size"],
            learning_rate=cfg["lr"], weight_decay=cfg["weight_decay"], adam_beta1=0.9, adam_beta2=0.999,
            lr_scheduler_type="linear", warmup_steps=cfg["warmup_steps"],
            label_smoothing_factor=cfg["label_smoothing"], max_grad_norm=cfg["max_grad_norm"],
            eval_strategy="epoch", logging_steps=0.02, logging_first_step=True, save_strategy="no",
            report_to="none", remove_unused_columns=False, disable_tqdm=True,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collate)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    peak, peak_kind = peak_memory_mb()
    with atomic_dir(args.out) as out:
        if args.method == "lora":
            lora.save_adapter(model, out / "adapter.safetensors", base=base_identity(base))
        else:
            model.save_pretrained(out, safe_serialization=True)
        write_json(out / "train_info.json", {
            "method": args.method, "trainable_params": trainable, "train_time_s": round(seconds, 1),
            "peak_memory_mb": round(peak, 1), "peak_memory_kind": peak_kind, "steps": trainer.state.global_step,
        })
        write_json(out / "log_history.json", trainer.state.log_history)
    print(f"train-{args.method}: {trainable:,} trainable parameters, {seconds:.0f} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (DataError, P.ParamError, ValueError) as e:
        sys.exit(f"train: error: {e}")
