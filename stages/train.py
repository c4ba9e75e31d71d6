"""train: fine-tune the pretrained model on E2E, with LoRA (`--method lora`) or all weights (`--method full`).

Both methods share one loop, the paper's Table 11 protocol for GPT-2 Medium on E2E: AdamW, linear schedule
with warm-up, label smoothing, conditional LM loss on the completion only. The transformers Trainer runs it.

Outputs: `--out` (DVC-tracked, byte-identical for identical inputs: weights, train_info.json, log_history.json
without timings) and `--costs` (a metrics file of times, throughput and memory, which vary run to run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
from dvclive import Live
from transformers import (GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainerState,
                          TrainingArguments)
from transformers.integrations import DVCLiveCallback

from stages.lib import checkpoints, cli, code, gpt2, li_liang, lora, optim, speed
from stages.lib import params as P
from stages.lib import runtime
from stages.lib.cli import RunError
from stages.lib.outputs import atomic_dir, check_writable, exclusive, write_json

# Trainer log fields that are wall-clock measurements: kept out of the DVC-tracked log history.
TIMING_SUFFIXES = ("_runtime", "_per_second")
LOG_EVERY = 0.02  # a log line, and the loss in log_history.json, every 2% of the run's steps
RAISED_AT = "LORA_E2E_RAISED_AT"  # launch's folder where each failing worker names when it raised


def config(p: P.Params, method: str) -> dict:
    """What a run's weights depend on: exactly the keys dvc.yaml declares for train-<method>@<seed> (the method's own
    keys, its recipe's layout, [PAD] and training loop with the method's `train` keys over it, processes, speed)."""
    recipe = P.recipe(p, method)
    return {"recipe": getattr(p, method).recipe, "layout": recipe.layout, "pad_token": recipe.pad_token,
            "loop": P.loop(p, method).model_dump(),
            method: getattr(p, method).model_dump(exclude={"recipe", "train", "generate"}),
            "processes": p.train.processes, "speed": p.speed.model_dump()}


def read_config(params: dict | P.Params, method: str, seed: int = 0) -> dict:
    """The run's settings, flat, validated before the model is loaded (errors name the parameter): `config`'s,
    the seed (dvc.yaml runs one train stage per seed of train.seeds) and the runtime keys, which change no number."""
    p = params if isinstance(params, P.Params) else P.validate(params)
    if seed < 0:
        raise P.ParamError(f"train.seeds: a seed must be >= 0, got {seed}")
    cfg = config(p, method)
    if cfg["loop"]["sampler"] == "authors" and p.speed.group_by_length:
        raise P.ParamError(f"speed.group_by_length and {P.key_of(p, method, 'train', 'sampler')}=authors both choose "
                           "the order of the examples: set one of them")
    return {**cfg["loop"], **cfg[method], "layout": cfg["layout"], "pad_token": cfg["pad_token"],
            "processes": cfg["processes"], "recipe": cfg["recipe"], "seed": seed,
            "checkpoint_steps": p.runtime.checkpoint_steps,
            "speed": speed.resolve(p.speed, p.runtime, speed.device_type())}


def optimizer_steps(examples: int, cfg: dict, world_size: int) -> int:
    """The Trainer's step count (Trainer.set_initial_training_values): batches per epoch x epochs, rounded up."""
    per_epoch = max(math.ceil(examples / (cfg["batch_size"] * world_size)), 1)
    return math.ceil(cfg["epochs"] * per_epoch)


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


def deterministic(logs: dict) -> dict:
    """A Trainer log entry without wall-clock fields (they go to the costs file), and without the final mean
    `train_loss`, which after a resume averages only the steps since the checkpoint (the per-log losses are all
    there): what is left is the same, byte for byte, for the same inputs, resumed or not."""
    return {k: v for k, v in logs.items() if not k.endswith(TIMING_SUFFIXES) and k != "train_loss"}


def deterministic_log(log_history: list[dict]) -> list[dict]:
    return [deterministic(entry) for entry in log_history]


class LiveMetrics(DVCLiveCallback):
    """transformers' DVCLive callback (per-log train loss and learning rate, per-epoch eval loss) for the logs'
    deterministic fields only, and without its dump of every TrainingArguments field: params.yaml is the
    configuration, and the dump holds temporary paths."""

    def setup(self, args, state, model):
        self._initialized = True

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if kept := deterministic(logs or {}):
            super().on_log(args, state, control, model=model, logs=kept, **kwargs)


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
    if cfg["pad_token"]:  # Li & Liang's [PAD] row, before LoRA freezes the base (it stays frozen there)
        li_liang.add_pad_row(model)
    if method == "lora":
        lora.add_lora(model, rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg["dropout"],
                      targets=tuple(cfg["targets"]))
    return model


def training_args(cfg: dict, output_dir: str, log_every: int) -> TrainingArguments:
    """Table 11's loop as TrainingArguments (AdamW betas 0.9/0.999 and eps from the authors' optimizer.py). The
    Trainer saves no checkpoint itself: CheckpointAtLogs decides (runtime.checkpoint_steps), into `output_dir`."""
    return TrainingArguments(
        output_dir=output_dir, seed=cfg["seed"], num_train_epochs=cfg["epochs"],
        per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["batch_size"],
        learning_rate=cfg["lr"], weight_decay=cfg["weight_decay"], adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=cfg["adam_epsilon"],
        lr_scheduler_type="linear", warmup_steps=cfg["warmup_steps"],
        label_smoothing_factor=cfg["label_smoothing"], max_grad_norm=cfg["max_grad_norm"],
        eval_strategy="epoch", logging_steps=log_every, logging_first_step=True, logging_nan_inf_filter=False,
        save_strategy="no", save_total_limit=1,
        report_to="none", remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty(),  # a bar with ETA on a terminal; EpochSummary lines in a log
        **speed.training_kwargs(cfg["speed"]),  # precision, compile, loader workers, pinned memory, sampler
        # Several CPU processes (train.processes > 1, no GPU): gloo, and use_cpu lets accelerate see them.
        # GPUs: NCCL, accelerate's default. One process: neither, or accelerate looks for a process group.
        **({"use_cpu": True, "ddp_backend": "gloo"}
           if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else {}),
        ddp_find_unused_parameters=False,  # every trainable weight takes part in every step
    )


class E2ETrainer(Trainer):
    """The transformers Trainer, with the authors' AdamW (stages/lib/optim.py) when a recipe's `optimizer` is
    `authors`: epsilon outside the bias correction, weight decay after the update, one parameter group
    (optimizer.py), the arithmetic of Li & Liang's fork's AdamW too; `torch` is the Trainer's torch.optim.AdamW. And
    the authors' loader order when its `sampler` is `authors`; `random` is the Trainer's (Li & Liang's too)."""

    def __init__(self, *args, optimizer_name: str, sampler_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_name, self.sampler_name = optimizer_name, sampler_name

    def _get_train_sampler(self, train_dataset=None):
        if self.sampler_name == "authors":  # their loader's order: the last batch is filled, never short
            data = train_dataset if train_dataset is not None else self.train_dataset
            return optim.AuthorsSampler(len(data), self.args.per_device_train_batch_size, self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_name == "authors":
            a = self.args
            self.optimizer = optim.AuthorsAdamW(optim.authors_param_groups(model or self.model), lr=a.learning_rate,
                                                betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                                                weight_decay=a.weight_decay, correct_bias=True)
        return super().create_optimizer(model)


class CheckpointAtLogs(TrainerCallback):
    """A resumable checkpoint at the first log step at least `every` steps after the last one (0: never).

    Only right after a log: the Trainer accumulates the loss it logs next in memory, and a checkpoint between two
    logs would lose that part, so a resumed run would log another average than an uninterrupted one. Where the
    checkpoints fall changes nothing else (runtime.checkpoint_steps is not a dependency of the stage).
    """

    def __init__(self, every: int):
        self.every, self.last = every, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = state.global_step  # 0, or the step a resumed run starts from

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % state.logging_steps == 0 and state.global_step - self.last >= self.every:
            control.should_save, self.last = True, state.global_step


def launch(processes: int, argv: list[str]) -> int:
    """Run this stage in `processes` worker processes under torch's elastic launcher (what `torchrun` runs).

    The Trainer then shards the data (NCCL on GPUs, gloo on CPU); rank 0 alone writes. If one worker fails, the
    launcher stops the others (no rank is left waiting in a collective) and this names the rank whose exception was
    raised first (`fit_worker`). The launcher's own choice is the first exit it saw, in whole seconds, rank 0 on a tie:
    often a rank whose error is only the lost connection to the one that failed.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={processes}", "--monitor-interval=0.5",
                                         "--module", "stages.train", *argv])
    with tempfile.TemporaryDirectory() as raised:
        os.environ[RAISED_AT] = raised  # the workers inherit it
        try:
            run(args)
        except ChildFailedError as e:
            at = dict((int(r), float(t)) for r, t in (f.name.split("_") for f in Path(raised).iterdir()))
            rank = min(at, key=at.get) if at else e.get_first_failure()[0]  # none raised: killed, by a signal or OOM
            raise RunError(f"rank {rank} of {processes} failed first (its error is above); the other ranks were "
                           "stopped") from None
        finally:
            del os.environ[RAISED_AT]
    return 0


def fit_worker(args, p: P.Params, cfg: dict) -> int:
    """`fit` in one of `launch`'s workers: when it raises, it says when in the launcher's folder (`<rank>_<time>`)."""
    try:
        return fit(args, p, cfg)
    except BaseException:
        with contextlib.suppress(OSError):  # the error to report is the one being raised
            Path(os.environ[RAISED_AT], f"{os.environ['RANK']}_{time.time()!r}").touch()  # a name: never half-written
        raise


def replay(callback: DVCLiveCallback, history: list[dict]) -> None:
    """Write a resumed run's logs up to its checkpoint into a fresh DVCLive directory, as the run logged them: the
    rows written after the checkpoint by the killed run must not stay (DVCLive's own resume keeps them)."""
    state = TrainerState(is_world_process_zero=True)
    for entry in history:
        callback.on_log(None, state, None, logs={k: v for k, v in entry.items() if k != "step"})


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

    p = P.read()
    cfg = read_config(p, args.method, args.seed)
    for path in (args.out, args.costs, Path(args.live) / "metrics.json"):
        check_writable(path)
    # One run per output and checkpoint folder: a second one (an orphan, a parallel repro) stops here, named.
    with exclusive(args.out, args.checkpoints, args.live):
        if cfg["processes"] > 1 and "LOCAL_RANK" not in os.environ:  # the launcher sets LOCAL_RANK in each worker
            return launch(cfg["processes"], list(sys.argv[1:] if argv is None else argv))
        return fit_worker(args, p, cfg) if RAISED_AT in os.environ else fit(args, p, cfg)


def fit(args, p: P.Params, cfg: dict) -> int:
    """One training run (in each worker process when train.processes > 1)."""
    base = Path(args.base)
    data = Path(args.data) / cfg["layout"]  # preprocess wrote every layout; the recipe picks one
    train_set, eval_set = gpt2.load_prepared(data, "train"), gpt2.load_prepared(data, "validation")
    steps = optimizer_steps(len(train_set), cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg["warmup_steps"] > steps:  # the learning rate would never reach the one asked for
        raise P.ParamError(f"{P.key_of(p, args.method, 'train', 'warmup_steps')}={cfg['warmup_steps']} > this run's "
                           f"{steps} optimizer steps "
                           f"({len(train_set)} examples, {cfg['epochs']:g} epochs, batch {cfg['batch_size']})")
    identity = gpt2.base_identity(base)

    torch.manual_seed(cfg["seed"])  # LoRA's A init happens in build_model: seed it too
    model = build_model(base, args.method, cfg)
    longest = max(max(len(x) for x in s["input_ids"]) for s in (train_set, eval_set))
    gpt2.check_fits(model, longest, f"{data}: longest training example")
    trainable = lora.count_trainable(model)

    scratch = None if args.checkpoints else tempfile.TemporaryDirectory()  # the Trainer wants an output_dir
    home = Path(args.checkpoints) if args.checkpoints else Path(scratch.name)
    targs = training_args(cfg, str(home), log_every=math.ceil(steps * LOG_EVERY))
    resume = None
    if args.checkpoints and targs.process_index == 0:  # rank 0 decides; the other ranks follow it
        # Everything the run's numbers depend on: the declared params, the seed, the data, the base, the code.
        fp = checkpoints.fingerprint({"params": config(p, args.method), "seed": args.seed}, args.method,
                                     [data / "train", data / "validation"], identity,
                                     {str(f): code.ROOT / f for f in code.closure("stages.train")})
        resume = checkpoints.prepare(home, fp)
    if args.checkpoints and targs.world_size > 1:
        torch.distributed.barrier()
        resume = resume or checkpoints.latest(home)
    # Only the main process logs; DVCLive must not touch dvc.yaml (the pipeline declares its files).
    live = (Live(dir=args.live, dvcyaml=None, save_dvc_exp=False, report=None) if targs.process_index == 0
            else None)
    live_metrics = LiveMetrics(live=live)
    if resume is not None and live is not None:
        replay(live_metrics, TrainerState.load_from_json(str(resume / "trainer_state.json")).log_history)
    callbacks = [StopOnNonFinite(), live_metrics, CheckpointAtLogs(cfg["checkpoint_steps"] if args.checkpoints else 0)]
    if targs.disable_tqdm and targs.process_index == 0:
        callbacks.append(EpochSummary(f"train-{args.method}"))
    trainer = E2ETrainer(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                         data_collator=gpt2.collate, callbacks=callbacks, optimizer_name=cfg["optimizer"],
                         sampler_name=cfg["sampler"])
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
    summary = Path(args.live) / "metrics.json"  # DVCLive's, in the order keys were first logged: a resumed run
    write_json(summary, json.loads(summary.read_text()))  # replays them in another, so sort them
    peak, peak_kind = peak_memory_mb()
    tokens = sum(len(x) for x in train_set["input_ids"]) * cfg["epochs"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with atomic_dir(args.out) as out:
        if args.method == "lora":
            lora.save_adapter(model, out / "adapter.safetensors", base=identity)
        else:
            model.save_pretrained(out, safe_serialization=True)
        write_json(out / "train_info.json", {
            "method": args.method, "recipe": cfg["recipe"], "trainable_params": trainable,
            "steps": trainer.state.global_step,
            "device": device, "peak_memory_kind": peak_kind,
        })
        write_json(out / "log_history.json", deterministic_log(trainer.state.log_history))
    write_json(args.costs, {"train_time_s": round(seconds, 1), "train_tokens_per_s": round(tokens / seconds, 1),
                            "peak_memory_mb": round(peak, 1),
                            "training_state_mb": round(training_state_mb(model, trainer.optimizer), 1)})
    if args.checkpoints:
        checkpoints.finish(Path(args.checkpoints))
    print(f"train-{args.method}: {trainable:,} trainable parameters, {seconds:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("train", main))
