"""Training-step time and peak memory: our LoRA (stages/lib/lora.py) vs PEFT's LoRA vs full fine-tuning, GPT-2 Medium.

A script, not a test: `python benchmarks/bench_lora.py` from the repository root (about 5 minutes on 2 CPU cores).
Random weights with GPT-2 Medium's shape (24 layers, d = 1024, 16 heads, vocab 50257; hard-coded, no hub), fp32,
CPU, one step = forward + loss + backward + AdamW step + zero_grad on a batch of 2 × 64 random tokens.

1. Time: the three variants live in this one process, each its own copy of one random base, and their steps are
   interleaved (the order rotates every repeat, so drift, warm-up and other load on the machine hit all alike).
   Reported: median and minimum of wall time and of this process's CPU time (time.process_time, all threads);
   and, as the headline, paired ratios: within each round (one step of each variant, back to back) the ratio of
   step times, then the median over rounds; pairing cancels load that varies more slowly than a round, which on a
   shared machine (other jobs on the same cores) is most of the noise. PEFT is configured as LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"],
   fan_in_fan_out=True): the whole c_attn with one A for q, k and v; ours adapts q and v with their own A and B.
   Both have 393,216 trainable parameters.
   Because the three variants differ only in the attention input projection, [0] also times that layer alone
   (GPT-2 Medium's c_attn, d = 1024, forward + backward of the input gradient, the same 2 × 64 tokens), with
   hundreds of interleaved repeats: short enough that the minimum is a stable, load-free estimate.
2. Memory: each variant runs alone in a fresh subprocess (so one variant's allocations cannot hide inside
   another's) and reports its peak resident set size (VmHWM, Linux). The peak is reset (/proc/self/clear_refs)
   after the model is built, so "train peak" is the high-water mark of the training steps alone: weights +
   gradients + optimizer state + activations. Where the reset is refused, the lifetime peak is reported as such.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.lib.lora import add_lora, count_trainable  # noqa: E402

RANK, ALPHA = 4, 32  # paper Table 11, E2E on GPT-2 M
VARIANTS = ("ours", "peft", "full")


def build_base(n_layer: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # GPT-2 Medium's shape (the hub config is not available offline).
    cfg = GPT2Config(n_layer=n_layer, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)
    return GPT2LMHeadModel(cfg).train()


def make(variant: str, base):
    if variant == "ours":
        return add_lora(base, rank=RANK, alpha=ALPHA)
    if variant == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn"],
                                               fan_in_fan_out=True))
    if variant == "full":
        return base
    raise ValueError(f"variant: unknown {variant!r}")


class Stepper:
    """One model with its AdamW (over its trainable parameters only) and a fixed batch."""

    def __init__(self, model, batch: int, seq: int):
        self.model = model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        self.ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(1))

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str, args) -> dict:
    """Runs in a fresh process: build, reset the RSS peak, train warmup + 1 steps, report the peak."""
    model = make(variant, build_base(args.n_layer))
    stepper = Stepper(model, args.batch, args.seq)
    rss_built = status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        peak_kind = "train"
    except OSError:
        peak_kind = "lifetime"
    for _ in range(args.warmup + 1):  # AdamW allocates its state at the first step; the second repeats the peak
        stepper.step()
    return {"variant": variant, "trainable": count_trainable(model), "rss_built_mib": rss_built / 1024,
            "peak_mib": status_kib("VmHWM") / 1024, "peak_kind": peak_kind}


def compare_times(args) -> dict:
    base = build_base(args.n_layer)
    steppers = {v: Stepper(make(v, copy.deepcopy(base) if v != "full" else base), args.batch, args.seq)
                for v in VARIANTS}
    for s in steppers.values():
        for _ in range(args.warmup):
            s.step()
    wall, cpu = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    for i in range(args.repeats):
        for v in VARIANTS[i % 3:] + VARIANTS[:i % 3]:  # rotate the order every repeat
            c0 = time.process_time()
            wall[v].append(steppers[v].step())
            cpu[v].append(time.process_time() - c0)
    return {"trainable": {v: count_trainable(s.model) for v, s in steppers.items()}, "wall": wall, "cpu": cpu}


def compare_layer(args, rounds: int = 300) -> dict:
    """Forward + backward of one c_attn (d = 1024) alone: frozen base, ours (q, v), PEFT (whole c_attn)."""
    from transformers.pytorch_utils import Conv1D

    class Attn(torch.nn.Module):  # the minimal parent PEFT and add_lora-like wrapping need
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(3 * 1024, 1024)

        def forward(self, x):
            return self.c_attn(x)

    from peft import LoraConfig, get_peft_model
    from stages.lib.lora import LoRAConv1D

    torch.manual_seed(0)
    base = Attn().requires_grad_(False)
    ours = copy.deepcopy(base)
    ours.c_attn = LoRAConv1D(ours.c_attn, {"q": (0, 1024), "v": (2048, 3072)}, RANK, ALPHA, 0.0)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn"],
                                                          fan_in_fan_out=True))
    models = {"base": base, "ours": ours, "peft": peft}
    x = torch.randn(args.batch, args.seq, 1024, requires_grad=True)
    times = {k: [] for k in models}
    for i in range(rounds):
        for k in list(models)[i % 3:] + list(models)[:i % 3]:
            t0 = time.perf_counter()
            models[k](x).sum().backward()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--n-layer", type=int, default=24, help="24 = GPT-2 Medium; fewer only to smoke-test")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    med = statistics.median
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq} tokens, "
          f"GPT-2 Medium shape ({args.n_layer} layers), fp32 CPU, AdamW; load average {os.getloadavg()}")
    lt = compare_layer(args)
    print(f"\n[0] one c_attn layer (d = 1024) forward + backward, {len(lt['base'])} interleaved repeats each")
    for k, v in lt.items():
        print(f"  {k:5s} min {min(v) * 1e3:7.2f} ms  median {med(v) * 1e3:7.2f} ms  "
              f"LoRA overhead (min - base min) {(min(v) - min(lt['base'])) * 1e3:5.2f} ms")
    print(f"  ours / peft: min {min(lt['ours']) / min(lt['peft']):.3f}  "
          f"median {med(lt['ours']) / med(lt['peft']):.3f}")
    r = compare_times(args)
    print(f"\n[1] step time, one process, interleaved (rotating order), {args.repeats} timed steps each")
    for v in VARIANTS:
        w, c = r["wall"][v], r["cpu"][v]
        print(f"  {v:5s} trainable {r['trainable'][v]:>11,}  wall median {med(w):6.3f} s min {min(w):6.3f} s  "
              f"cpu median {med(c):6.3f} s min {min(c):6.3f} s")
    for a, b in (("ours", "peft"), ("ours", "full"), ("peft", "full")):
        print(f"  {a} / {b}: ratio of minima wall {min(r['wall'][a]) / min(r['wall'][b]):.3f} "
              f"cpu {min(r['cpu'][a]) / min(r['cpu'][b]):.3f}")
        paired = {k: sorted(x / y for x, y in zip(r[k][a], r[k][b])) for k in ("wall", "cpu")}
        print(f"  {a} / {b}: paired wall {med(paired['wall']):.3f} (range {paired['wall'][0]:.2f}-"
              f"{paired['wall'][-1]:.2f}), paired cpu {med(paired['cpu']):.3f}; "
              f"ratio of medians wall {med(r['wall'][a]) / med(r['wall'][b]):.3f} "
              f"cpu {med(r['cpu'][a]) / med(r['cpu'][b]):.3f}")
    print(f"  load average after [1]: {os.getloadavg()}")

    print("\n[2] peak memory, one fresh subprocess per variant")
    res = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--child", v] + [
            f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("threads", "batch", "seq", "warmup", "n-layer")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[v] = c = json.loads(out.strip().splitlines()[-1])
        print(f"  {v:5s} RSS after build {c['rss_built_mib']:7,.0f} MiB   {c['peak_kind']} peak {c['peak_mib']:7,.0f} MiB")
    for v in ("ours", "peft"):
        print(f"  {v} / full peak: {res[v]['peak_mib'] / res['full']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
