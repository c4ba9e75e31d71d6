"""train: fine-tune the pretrained model on E2E, with LoRA (`--method lora`) or all weights (`--method full`).

Both methods share one loop, the paper's Table 11 protocol for GPT-2 Medium on E2E: AdamW, linear schedule
with warm-up, label smoothing, conditional LM loss on the completion only. The transformers Trainer runs it.

Outputs: `--out` (DVC-tracked, byte-identical for identical inputs: weights, train_info.json, log_history.json
without timings) and `--costs` (a metrics file of times, throughput and memory, which vary run to run).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
from dvclive import Live
from transformers import GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import DVCLiveCallback

from stages.lib import checkpoints, cli, gpt2, lora, speed
from stages.lib import params as P
from stages.lib import runtime
from stages.lib.cli import InputError, RunError
from stages.lib.outputs import atomic_dir, check_writable, write_json

KNOWN = {
    "train": ("seeds", "epochs", "batch_size", "label_smoothing", "warmup_steps", "max_grad_norm", "adam_epsilon",
              "gpt2_dropout", "processes", "checkpoint_steps"),
    "lora": ("rank", "alpha", "dropout", "targets", "lr", "weight_decay", "train", "generate"),
    "full": ("lr", "weight_decay", "train", "generate"),
}
# Shared loop keys a method may set for itself (`full.train`): Li & Liang's FT recipe differs in these.
OVERRIDABLE = ("epochs", "batch_size", "label_smoothing", "warmup_steps", "max_grad_norm", "adam_epsilon",
               "gpt2_dropout")
# Trainer log fields that are wall-clock measurements: kept out of the DVC-tracked log history.
TIMING_SUFFIXES = ("_runtime", "_per_second")


def read_config(params: dict, method: str, seed: int = 0) -> dict:
    """All knobs this run uses, validated before the model is loaded (errors name the parameter). The seed comes
    from the command line: dvc.yaml runs one train stage per seed of train.seeds."""
    for section in ("train", method):
        P.warn_unknown(params, section, KNOWN[section])
    params = P.with_overrides(params, method, "train", OVERRIDABLE)
    if seed < 0:
        raise P.ParamError(f"train.seeds: a seed must be >= 0, got {seed}")
    cfg = {
        "seed": seed,
        "epochs": P.number(params, "train.epochs", min=0, min_inclusive=False, max=10_000),
        "batch_size": P.number(params, "train.batch_size", kind=int, min=1),
        "label_smoothing": P.number(params, "train.label_smoothing", min=0, max=1, max_inclusive=False),
        "warmup_steps": P.number(params, "train.warmup_steps", kind=int, min=0),
        "max_grad_norm": P.number(params, "train.max_grad_norm", min=0),
        "adam_epsilon": P.number(params, "train.adam_epsilon", min=0, min_inclusive=False),
        "gpt2_dropout": P.number(params, "train.gpt2_dropout", min=0, max=1, max_inclusive=False),
        "processes": P.number(params, "train.processes", kind=int, min=1, max=1024),
        "checkpoint_steps": P.number(params, "train.checkpoint_steps", kind=int, min=0),
        "lr": P.number(params, f"{method}.lr", min=0, min_inclusive=False),
        "weight_decay": P.number(params, f"{method}.weight_decay", min=0),
    }
    cfg["speed"] = speed.resolve(speed.read_config(params), speed.device_type())
    if method == "lora":
        cfg["rank"] = P.number(params, "lora.rank", kind=int, min=1)
        cfg["alpha"] = P.number(params, "lora.alpha", min=0, min_inclusive=False)
        cfg["dropout"] = P.number(params, "lora.dropout", min=0, max=1, max_inclusive=False)
        targets = P.get(params, "lora.targets")
        try:  # lora.py is the one source of truth for what a valid target list is
            cfg["targets"] = list(lora.check_args(cfg["rank"], cfg["alpha"], cfg["dropout"], targets))
        except (TypeError, ValueError) as e:
            raise P.ParamError(f"lora.{e}") from None
    return cfg


class StopOnNonFinite(TrainerCallback):
    """Fail the run at the first logged non-finite loss, or non-finite trainable weight, naming the step.

    Checked at every log (2% of training), not every step: a check is a device-to-host sync on a GPU.
    The Trainer's `logging_nan_inf_filter` is turned off below, else it would log a NaN loss as a finite mean.
    """

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        for key in ("loss", "eval_loss"):
            if key in (logs or {}):
                gpt2.check_loss(float(logs[key]), state.global_step)
        if model is not None:
            # Frozen weights were checked at load and cannot change: only the trainable ones, cheaply for LoRA.
            gpt2.check_finite(model, f"trainable weights at step {state.global_step}", error=RunError,
                              trainable_only=True)


class LiveMetrics(DVCLiveCallback):
    """transformers' DVCLive callback (per-log train loss and learning rate, per-epoch eval loss), without its dump
    of every TrainingArguments field: params.yaml is the configuration, and the dump holds temporary paths."""

    def setup(self, args, state, model):
        self._initialized = True


class EpochSummary(TrainerCallback):
    """Where no terminal shows a progress bar (CI, a queued experiment's log): one line per epoch, not per step."""

    def __init__(self, name: str):
        self.name, self.start = name, time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        done = state.global_step / max(state.max_steps, 1)
        elapsed = time.perf_counter() - self.start
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        eta = elapsed * (1 - done) / done if done else float("nan")
        print(f"{self.name}: epoch {state.epoch:.2f}, step {state.global_step}/{state.max_steps}, "
              f"train loss {losses[-1] if losses else float('nan'):.4f}, {elapsed:.0f} s, ETA {eta:.0f} s",
              file=sys.stderr, flush=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            print(f"{self.name}: eval loss {metrics['eval_loss']:.4f} at step {state.global_step}", file=sys.stderr,
                  flush=True)


def training_state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> float:
    """Bytes held by the training state, counted tensor by tensor: every weight, the trainable weights' gradients
    and the optimizer's state (AdamW: two moments per trainable weight). What LoRA saves shows here: on GPT-2
    Medium full fine-tuning holds ~4x the weights, LoRA ~1x. Activations are not counted (see peak_memory_mb)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # gradients
    if optimizer is not None:
        size += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                    if torch.is_tensor(t))
    return size / 2**20


def peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"  # ru_maxrss is in KiB


def build_model(base_dir: Path, method: str, cfg: dict) -> GPT2LMHeadModel:
    # GPT-2's own dropouts, set for both methods alike (the authors' model.py has none).
    model = gpt2.load_model(base_dir, dropout=cfg["gpt2_dropout"])
    if method == "lora":
        lora.add_lora(model, rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg["dropout"],
                      targets=tuple(cfg["targets"]))
    return model


def training_args(cfg: dict, output_dir: str, checkpoints: bool = False) -> TrainingArguments:
    """Table 11's loop as TrainingArguments (AdamW betas 0.9/0.999 and eps from the authors' optimizer.py).
    `output_dir` holds the Trainer's checkpoints, every train.checkpoint_steps steps, when `checkpoints`."""
    every = cfg["checkpoint_steps"] if checkpoints else 0
    return TrainingArguments(
        output_dir=output_dir, seed=cfg["seed"], num_train_epochs=cfg["epochs"],
        per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["batch_size"],
        learning_rate=cfg["lr"], weight_decay=cfg["weight_decay"], adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=cfg["adam_epsilon"],
        lr_scheduler_type="linear", warmup_steps=cfg["warmup_steps"],
        label_smoothing_factor=cfg["label_smoothing"], max_grad_norm=cfg["max_grad_norm"],
        eval_strategy="epoch", logging_steps=0.02, logging_first_step=True, logging_nan_inf_filter=False,
        save_strategy="steps" if every else "no", save_steps=every or 500, save_total_limit=1,
        report_to="none", remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty(),  # a bar with ETA on a terminal; EpochSummary lines in a log
        **speed.training_kwargs(cfg["speed"]),  # precision, compile, loader workers, pinned memory, sampler
        # Several CPU processes (train.processes > 1, no GPU): gloo, and use_cpu lets accelerate see them.
        # GPUs: NCCL, accelerate's default. One process: neither, or accelerate looks for a process group.
        **({"use_cpu": True, "ddp_backend": "gloo"}
           if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else {}),
        ddp_find_unused_parameters=False,  # every trainable weight takes part in every step
    )


def deterministic_log(log_history: list[dict]) -> list[dict]:
    """The Trainer's log without wall-clock fields, and without its final mean `train_loss`, which after a resume
    averages only the steps since the checkpoint; the per-log losses are all there."""
    return [{k: v for k, v in entry.items() if not k.endswith(TIMING_SUFFIXES) and k != "train_loss"}
            for entry in log_history]


def launch(processes: int, argv: list[str]) -> int:
    """Run this stage in `processes` worker processes under torch's elastic launcher (what `torchrun` runs).

    The Trainer then shards the data (NCCL on GPUs, gloo on CPU); rank 0 alone writes. If one worker fails, the
    launcher stops the others (no rank is left waiting in a collective) and names the first failure.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={processes}", "--monitor-interval=0.5",
                                         "--module", "stages.train", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise RunError(f"rank {rank} of {processes} exited with status {failure.exitcode} (its error is above); "
                       "the other ranks were stopped") from None
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("lora", "full"), required=True)
    ap.add_argument("--seed", type=int, required=True, help="one of train.seeds (dvc.yaml's matrix passes it)")
    ap.add_argument("--data", required=True, help="preprocess output (Arrow datasets train/, validation/)")
    ap.add_argument("--base", required=True, help="pretrained model directory (download output)")
    ap.add_argument("--out", required=True, help="output directory (weights or adapter, train_info, log)")
    ap.add_argument("--costs", required=True, help="metrics file for time, throughput and peak memory")
    ap.add_argument("--live", required=True, help="DVCLive directory: loss and learning-rate curves, eval loss")
    ap.add_argument("--checkpoints", help="directory for resumable checkpoints (kept until the run finishes)")
    args = ap.parse_args(argv)
    runtime.keep_freed_memory()
    datasets.disable_progress_bars()

    cfg = read_config(P.load(), args.method, args.seed)
    for path in (args.out, args.costs, Path(args.live) / "metrics.json"):
        check_writable(path)
    if cfg["processes"] > 1 and "LOCAL_RANK" not in os.environ:  # the launcher sets LOCAL_RANK in each worker
        return launch(cfg["processes"], list(sys.argv[1:] if argv is None else argv))
    data, base = Path(args.data), Path(args.base)
    train_set, eval_set = gpt2.load_prepared(data, "train"), gpt2.load_prepared(data, "validation")
    identity = gpt2.base_identity(base)

    torch.manual_seed(cfg["seed"])  # LoRA's A init happens in build_model: seed it too
    model = build_model(base, args.method, cfg)
    longest = max(max(len(x) for x in s["input_ids"]) for s in (train_set, eval_set))
    gpt2.check_fits(model, longest, f"{data}: longest training example")
    trainable = lora.count_trainable(model)

    scratch = None if args.checkpoints else tempfile.TemporaryDirectory()  # the Trainer wants an output_dir
    home = Path(args.checkpoints) if args.checkpoints else Path(scratch.name)
    targs = training_args(cfg, str(home), checkpoints=bool(args.checkpoints))
    resume = None
    if args.checkpoints and targs.process_index == 0:  # rank 0 decides; the other ranks follow it
        code = [Path(m.__file__) for m in (sys.modules[__name__], lora, gpt2, checkpoints)]
        fp = checkpoints.fingerprint(cfg, args.method, [data / "train", data / "validation"], identity, code)
        resume = checkpoints.prepare(home, fp)
    if args.checkpoints and targs.world_size > 1:
        torch.distributed.barrier()
        resume = resume or checkpoints.latest(home)
    # Only the main process logs; DVCLive must not touch dvc.yaml (the pipeline declares its files).
    live = (Live(dir=args.live, dvcyaml=None, save_dvc_exp=False, report=None, resume=resume is not None)
            if targs.process_index == 0 else None)
    callbacks = [StopOnNonFinite(), LiveMetrics(live=live)]
    if targs.disable_tqdm and targs.process_index == 0:
        callbacks.append(EpochSummary(f"train-{args.method}"))
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=gpt2.collate, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # a dict per log on stdout: EpochSummary and DVCLive say it better
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if scratch is not None:
        scratch.cleanup()
    seconds = time.perf_counter() - start
    if not trainer.is_world_process_zero():
        return 0
    model = trainer.accelerator.unwrap_model(trainer.model)
    gpt2.check_finite(model, "trained weights", error=RunError)
    peak, peak_kind = peak_memory_mb()
    tokens = sum(len(x) for x in train_set["input_ids"]) * cfg["epochs"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with atomic_dir(args.out) as out:
        if args.method == "lora":
            lora.save_adapter(model, out / "adapter.safetensors", base=identity)
        else:
            model.save_pretrained(out, safe_serialization=True)
        write_json(out / "train_info.json", {
            "method": args.method, "trainable_params": trainable, "steps": trainer.state.global_step,
            "device": device, "peak_memory_kind": peak_kind,
        })
        write_json(out / "log_history.json", deterministic_log(trainer.state.log_history))
    costs = {"train_time_s": round(seconds, 1), "train_tokens_per_s": round(tokens / seconds, 1),
             "peak_memory_mb": round(peak, 1),
             "training_state_mb": round(training_state_mb(model, trainer.optimizer), 1)}
    write_json(args.costs, costs)
    live.log_metric("train/tokens_per_s", costs["train_tokens_per_s"], plot=False)
    live.make_summary()
    if args.checkpoints:
        checkpoints.finish(Path(args.checkpoints))
    print(f"train-{args.method}: {trainable:,} trainable parameters, {seconds:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("train", main))
