"""Speed of the full protocol on whatever device is present: training steps, decoding, and a projected wall time.

    python benchmarks/bench_gpu.py --out benchmarks/bench_gpu.json   # budgeted for < 8 min on one H200 (--budget-s)

Model: GPT-2 Medium's shape (24 layers, d = 1024, 16 heads, vocab 50,257; built in code, random weights, no hub).
Data: the token lengths of the real E2E rows shipped in data/sample/*.csv (1,932 rows), tokenised with
data/gpt2/tokenizer.json in the paper format "MR<|endoftext|> ref<|endoftext|>" (stages.preprocess), batched by
stages.lib.gpt2.collate, so padding is what the train stage pays.

Training step (the train stage's Trainer step, written out so each option can be timed alone): batch 8 from a
DataLoader (random sampler, or transformers' LengthGroupedSampler for group_by_length), forward under
stages.lib.speed.precision_context, transformers' LabelSmoother (0.1) on the completion tokens, backward, fused AdamW
(the Trainer's default optimizer), linear schedule, zero_grad. Methods: LoRA (stages.lib.lora.add_lora, r = 4, alpha 32,
dropout 0.1 on q and v: the paper's Table 11), full fine-tuning, and PEFT's LoRA through the same loop:
LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"], fan_in_fan_out=True), i.e. r = 4 on the
whole fused c_attn, the same 393,216 trainable parameters as ours. Warm-up steps are untimed; timed regions start
and end with torch.cuda.synchronize(). Eval (forward + loss, no grad) is timed the same way, for the per-epoch
evaluation the train stage runs.

Decoding: the paper's settings (beam 10, length penalty 0.9, no repeated 4-gram, 64 new tokens) through
stages.generate.generate on 630 contexts (the E2E test set's size; the sample's 230 distinct MRs, cycled). The
decoder is pluggable (`--decoder module:function`, same signature). EOS's embedding row is zeroed so that the random
model never stops early: every beam runs all 64 tokens (`mean_output_tokens` shows it), an upper bound for a trained
model, which stops after about 25-40 steps.

Projection: per method 5 x 5,258 steps (42,061 rows / batch 8) + warm-up, 5 x 584 eval batches (4,672 dev rows),
decoding 630 MRs for each of base, lora and full (dvc.yaml), and scoring from a constant measured on the 2-core CPU
(benchmarks/NOTES.md). Not counted: download, preprocessing, model loading.

`--shrink` (automatic without CUDA): a 2-layer, d = 32 model, batch 2, a few steps, 4 contexts; finishes in well
under a minute on a CPU and exists so the script cannot rot (tests/test_bench_gpu.py). Its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.lib import params as P  # noqa: E402
from stages.lib import runtime  # noqa: E402
from stages.lib import speed  # noqa: E402
from stages.lib.e2e import group_by_mr, read_e2e_csv  # noqa: E402
from stages.lib.lora import add_lora, count_trainable  # noqa: E402
from stages.lib.gpt2 import EOS, collate, load_tokenizer  # noqa: E402
from stages.preprocess import encode_batch, encode_contexts  # noqa: E402

TRAIN_ROWS, DEV_ROWS, TEST_MRS, EPOCHS, BATCH = 42_061, 4_672, 630, 5, 8  # E2E v1.0.0; params.yaml train.*
STEPS_PER_EPOCH, EVAL_BATCHES = math.ceil(TRAIN_ROWS / BATCH), math.ceil(DEV_ROWS / BATCH)  # 5,258 and 584
DECODED = ("base", "lora", "full")  # dvc.yaml's generate foreach
# Scoring is CPU-bound (Python metrics + METEOR's JVM): a GPU does not change it. Constants measured on the 2-core
# development VM, benchmarks/NOTES.md "Scoring speed on a quiet machine (2026-11-28 22:21 UTC)": the first system
# builds METEOR's paraphrase index (20.72 s), later ones take 4.73-6.22 s (the maximum is used).
SCORE_FIRST_S, SCORE_WARM_S = 20.72, 6.22
PAPER_DECODING = {"search": "authors", "eos_ids": [50256, 628], "num_beams": 10, "length_penalty": 0.9,
                  "no_repeat_ngram_size": 4, "max_new_tokens": 64, "early_stopping": True}
LR = {"lora": 2e-4, "peft": 2e-4, "full": 5e-5}
SAMPLE = ROOT / "data" / "sample"
SHAPES = {"full": {"n_layer": 24, "n_embd": 1024, "n_head": 16}, "shrunk": {"n_layer": 2, "n_embd": 32, "n_head": 2}}
DEFAULT = {"precision": "fp32", "compile": False, "workers": 0, "pin": "auto", "group": False}


def config_name(method: str, o: dict) -> str:
    extra = [o["precision"]] + (["compile"] if o["compile"] else []) + (["group"] if o["group"] else []) \
        + ([f"workers{o['workers']}"] if o["workers"] else []) + ([f"pin={o['pin']}"] if o["pin"] != "auto" else [])
    return f"{method}/{'+'.join(extra)}"


def plan(shrunk: bool) -> list[tuple[str, tuple]]:
    """Jobs in priority order, ("train", (method, options)) or ("decode", (precision, compile, batch size)). The
    first four (default fidelity: fp32 LoRA, full FT, PEFT, decoding) always run; later ones are cut by the budget."""
    def t(method, **o):
        return "train", (method, {**DEFAULT, **o})

    def d(precision, compiled, bs):
        return "decode", (precision, compiled, bs)
    if shrunk:  # the last four are refused on a CPU: listed under "skipped" with the reason
        return [t("lora"), t("full"), t("peft"), d("fp32", False, 2),
                t("lora", group=True), t("lora", workers=1),
                d("fp32", False, 4), t("lora", precision="bf16"), t("lora", compile=True), t("lora", pin=True),
                d("bf16", False, 2)]
    return ([t("lora"), t("full"), t("peft"), d("fp32", False, 16)]
            + [t(m, precision=p) for p in ("bf16", "tf32") for m in ("lora", "full", "peft")]
            + [d("bf16", False, 16), d("fp32", False, 64)]
            + [t("lora", pin=False), t("lora", workers=2), t("full", workers=2), t("lora", group=True),
               t("full", group=True), t("lora", precision="bf16", group=True, workers=2),
               t("full", precision="bf16", group=True, workers=2),
               t("lora", precision="bf16", group=True, workers=2, compile=True),
               t("full", precision="bf16", group=True, workers=2, compile=True)]
            + [d("bf16", False, 64), d("tf32", False, 16), d("bf16", True, 64)])


def e2e_data(tok) -> tuple[list[dict], list[list[int]]]:
    """Training examples of every shipped sample row, and the distinct MRs' contexts (paper format)."""
    rows = [r for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv") for r in read_e2e_csv(SAMPLE / name)]
    enc = encode_batch({"mr": [mr for mr, _ in rows], "ref": [ref for _, ref in rows]}, tok, "paper")
    examples = [{"input_ids": ids, "n_context": n} for ids, n in zip(enc["input_ids"], enc["n_context"])]
    contexts = encode_contexts(tok, [mr for mr, _ in group_by_mr(rows)], "paper")
    return examples, contexts


def length_stats(lengths: list[int]) -> dict:
    s = sorted(lengths)
    return {"n": len(s), "mean": sum(s) / len(s), "p50": s[len(s) // 2], "p90": s[int(len(s) * 0.9)], "max": s[-1]}


def build_model(shape: dict, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, **shape)
    with torch.device(device):
        return GPT2LMHeadModel(cfg)


def with_method(model, method: str):
    if method == "lora":
        return add_lora(model, rank=4, alpha=32, dropout=0.1, targets=("q", "v"))
    if method == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["c_attn"],
                                                fan_in_fan_out=True))
    return model


class Memory:
    """Peak memory of one measurement: CUDA max allocated, or the CPU RSS high-water mark since reset()."""

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda_max_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
            self.kind = "cpu_peak_rss"
        except OSError:
            self.kind = "cpu_peak_rss_lifetime"

    def peak_mib(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def state_mib(model, opt) -> float:
    """Tensor bytes the step keeps: weights + gradients of trainable weights + optimizer state."""
    b = sum(p.numel() * p.element_size() for p in model.parameters())
    b += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    b += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return b / 2**20


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_train(method: str, o: dict, shape: dict, examples: list[dict], device: str, batch: int, warmup: int,
                  steps: int, max_s: float, eval_steps: int) -> dict:
    from torch.utils.data import DataLoader, RandomSampler
    from transformers import get_linear_schedule_with_warmup
    from transformers.trainer_pt_utils import LabelSmoother, LengthGroupedSampler

    mem = Memory(device)
    mem.reset()
    model = with_method(build_model(shape, device), method).train()
    trainable = count_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[method], weight_decay=0.01,
                            fused=True)  # transformers >= 5 with torch >= 2.8: optim "adamw_torch_fused"
    sched = get_linear_schedule_with_warmup(opt, 500, EPOCHS * STEPS_PER_EPOCH)
    smoother = LabelSmoother(epsilon=0.1)
    net = torch.compile(model) if o["compile"] else model  # what TrainingArguments(torch_compile=True) does
    gen = torch.Generator().manual_seed(110)
    sampler = (LengthGroupedSampler(batch, lengths=[len(e["input_ids"]) for e in examples], generator=gen)
               if o["group"] else RandomSampler(examples, generator=gen))
    pin = o["pin"] if o["pin"] != "auto" else device == "cuda"
    loader = DataLoader(examples, batch_size=batch, sampler=sampler, collate_fn=collate, drop_last=True,
                        num_workers=o["workers"], pin_memory=pin, persistent_workers=o["workers"] > 0)

    def batches():
        while True:
            yield from loader

    def loss_of(b):
        b = {k: v.to(device, non_blocking=pin) for k, v in b.items()}
        labels = b.pop("labels")  # (batch, width); -100 on context and padding
        n_items = labels[:, 1:].ne(-100).sum()  # on the device: no host sync (as Trainer.get_batch_samples)
        with speed.precision_context(o["precision"], device):
            return smoother(net(**b), labels, shift_labels=True, num_items_in_batch=n_items)

    def step(b):
        loss = loss_of(b)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    it = batches()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(next(it))
    sync(device)
    warm_s = time.perf_counter() - t0
    n = real = padded = 0
    losses = []
    start = time.perf_counter()
    while n < steps and (n < 3 or time.perf_counter() - start < max_s):
        b = next(it)
        real += int(b["attention_mask"].sum())  # CPU tensor from collate: no device sync
        padded += b["input_ids"].numel()
        losses.append(step(b))
        n += 1
    sync(device)
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        for _ in range(min(2, eval_steps)):  # untimed: a compiled model recompiles for eval mode
            loss_of(next(it))
        sync(device)
        e0 = time.perf_counter()
        for _ in range(eval_steps):
            losses.append(loss_of(next(it)))
        sync(device)
        eval_s = time.perf_counter() - e0
    final = torch.stack(losses).float().cpu()
    if not torch.isfinite(final).all():
        raise FloatingPointError(f"{config_name(method, o)}: non-finite loss {final.tolist()}")
    out = {"method": method, **{k: o[k] for k in ("precision", "compile", "workers", "group")}, "pin_memory": pin,
           "trainable_params": trainable, "warmup_steps": warmup, "warmup_s": warm_s, "steps": n, "seconds": seconds,
           "steps_per_s": n / seconds, "tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
           "padding_fraction": 1 - real / padded, "eval_steps": eval_steps,
           "eval_steps_per_s": eval_steps / eval_s, "mean_loss": float(final.mean()),
           "peak_memory_mib": mem.peak_mib(), "peak_memory_kind": mem.kind, "state_mib": state_mib(model, opt)}
    del net, model, opt, loader, it
    if o["compile"]:
        torch._dynamo.reset()
    return out


def measure_decode(decoder, tok, shape: dict, contexts: list, device: str, precision: str, compiled: bool,
                   batch_size: int, max_s: float, warm: int) -> dict:
    mem = Memory(device)
    mem.reset()
    model = build_model(shape, device).eval()  # merged LoRA = plain GPT-2: one model stands for all three
    # A random GPT-2 mostly predicts its input token (tied embeddings: the residual stream still looks like the
    # input embedding), and every context ends with <|endoftext|>: it would stop at once and time nothing. Zeroing
    # EOS's (tied) embedding row makes its logit 0 among 50,256 random ones: EOS is (almost) never chosen, every beam
    # runs all 64 tokens, and the repeats trigger the 4-gram ban. An upper bound for a trained model.
    with torch.no_grad():
        model.transformer.wte.weight[EOS] = 0
    model = speed.compile_for_generation(model, compiled)
    cfg = {**PAPER_DECODING, "batch_size": batch_size}

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    with speed.precision_context(precision, device):
        decoder(model, contexts[:warm], cfg, decode)  # untimed warm-up (compile, allocator, cuBLAS)
        sync(device)
        done, outputs, start = 0, [], time.perf_counter()
        while done < len(contexts) and (done == 0 or time.perf_counter() - start < max_s):
            outputs += decoder(model, contexts[done:done + batch_size], cfg, decode)
            done = len(outputs)
        sync(device)
        seconds = time.perf_counter() - start
    del model
    if compiled:
        torch._dynamo.reset()
    tokens = [len(tok.encode(x)) for x in outputs] if tok is not None else [0]
    return {"precision": precision, "compile": compiled, "batch_size": batch_size, "contexts": len(contexts),
            "mean_output_tokens": sum(tokens) / len(tokens),
            "contexts_measured": done, "seconds": seconds, "outputs_per_s": done / seconds,
            "projected_630_s": TEST_MRS * seconds / done, "empty_outputs": sum(not x for x in outputs),
            "peak_memory_mib": mem.peak_mib(), "peak_memory_kind": mem.kind}


def skip_reason(o: dict, device: str) -> str | None:
    try:
        speed.resolve(P.Speed(precision=o["precision"], compile=o["compile"], group_by_length=o["group"]),
                      P.Runtime(dataloader_workers=o["workers"], pin_memory=o["pin"], checkpoint_steps=0,
                                generate_batch_size=1), device)
    except P.ParamError as e:
        return f"refused on this device: {e}"
    if o["compile"] and device != "cuda":
        return "torch.compile is measured on CUDA only (inductor's compile time on a CPU exceeds the shrunk budget)"
    return None


def project(train: dict, decode: dict, pick) -> dict:
    """Wall time of the full protocol from the fastest measured config of each part that `pick` allows."""
    out = {"parts_s": {}, "configs": {}}
    for method in ("lora", "full"):
        cands = {k: r for k, r in train.items() if r.get("method") == method and "error" not in r and pick(r)}
        if not cands:
            return {"missing": f"no measured {method} config qualifies"}

        def total(r):
            return (EPOCHS * STEPS_PER_EPOCH / r["steps_per_s"] + r["warmup_s"]
                    + EPOCHS * EVAL_BATCHES / r["eval_steps_per_s"])
        name = min(cands, key=lambda k: total(cands[k]))
        out["configs"][f"train_{method}"] = name
        out["parts_s"][f"train_{method}"] = total(cands[name])
    dc = {k: r for k, r in decode.items() if "error" not in r and pick(r)}
    if not dc:
        return {"missing": "no measured decoding config qualifies"}
    name = min(dc, key=lambda k: dc[k]["projected_630_s"])
    out["configs"]["decode"] = name
    out["parts_s"]["decode_base_lora_full"] = len(DECODED) * dc[name]["projected_630_s"]
    out["parts_s"]["score_cpu_constant"] = SCORE_FIRST_S + (len(DECODED) - 1) * SCORE_WARM_S
    out["total_s"] = sum(out["parts_s"].values())
    return out


def check_finite(obj, where="$") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise SystemExit(f"bench_gpu: error: non-finite number at {where}")


def device_info(device: str) -> dict:
    import peft
    import transformers

    info = {"type": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        cap = torch.cuda.get_device_capability()
        info.update(name=torch.cuda.get_device_name(), capability=f"{cap[0]}.{cap[1]}", cuda=torch.version.cuda,
                    memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_gpu.json", help="JSON file to write (sorted keys)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--shrink", action="store_true", help="tiny shape, few steps (automatic without CUDA)")
    size.add_argument("--no-shrink", action="store_true", help="the full measurement even without CUDA (slow)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting measurements after this many "
                    "seconds (default 400; shrunk 30)")
    ap.add_argument("--decoder", default="stages.generate:generate", help="module:function, generate()'s signature")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    runtime.keep_freed_memory()  # as the stages do: on a CPU, freed logits buffers are not page-faulted in again
    device = speed.device_type()
    shrunk = args.shrink or (device != "cuda" and not args.no_shrink)
    budget = args.budget_s if args.budget_s is not None else (30 if shrunk else 400)
    mod, _, fn = args.decoder.partition(":")
    decoder = getattr(importlib.import_module(mod), fn)
    shape = SHAPES["shrunk" if shrunk else "full"]
    batch, warmup, steps, max_s, eval_steps = (2, 1, 3, 2.0, 1) if shrunk else (BATCH, 10, 60, 3.0, 20)
    n_contexts, dec_max_s = (4, 3.0) if shrunk else (TEST_MRS, 60.0)

    tok = load_tokenizer(ROOT / "data" / "gpt2" / "tokenizer.json")
    examples, mrs = e2e_data(tok)
    contexts = [mrs[i % len(mrs)] for i in range(n_contexts)]
    random.Random(0).shuffle(contexts)
    result = {"mode": "shrunk" if shrunk else "full", "device": device_info(device), "decoder": args.decoder,
              "shape": {**shape, "vocab_size": 50257, "batch_size": batch}, "decoding": PAPER_DECODING,
              "data": {"source": "data/sample/*.csv, paper format", "example_tokens": length_stats(
                  [len(e["input_ids"]) for e in examples]), "context_tokens": length_stats([len(c) for c in mrs])},
              "train": {}, "decode": {}, "skipped": {}, "errors": {}}
    jobs = plan(shrunk)
    default_bs = jobs[3][1][2]
    for i, (kind, job) in enumerate(jobs):
        left = budget - (time.perf_counter() - t_start)
        if kind == "train":
            method, o = job
            name = config_name(method, o)
            reason = skip_reason(o, device)
            need = (120 if o["compile"] else 10) if not shrunk else 2
        else:
            precision, compiled, bs = job
            name = f"{precision}{'+compile' if compiled else ''}/bs{bs}"
            reason = skip_reason({**DEFAULT, "precision": precision, "compile": compiled}, device)
            need = (120 if compiled else 20) if not shrunk else 2
        if reason is None and left < need and i >= 4:  # the default-fidelity figures are always measured
            reason = f"time budget: {left:.0f} s left of --budget-s {budget:g}, this needs ~{need} s"
        if reason:
            result["skipped"][f"{kind}:{name}"] = reason
            continue
        print(f"[{time.perf_counter() - t_start:6.1f} s] {kind} {name}", file=sys.stderr, flush=True)
        try:
            if kind == "train":
                result["train"][name] = measure_train(method, o, shape, examples, device, batch, warmup, steps,
                                                      max_s, eval_steps)
            else:
                result["decode"][name] = measure_decode(decoder, tok, shape, contexts, device, precision, compiled,
                                                        bs, min(dec_max_s if i == 3 else dec_max_s / 2,
                                                                max(left - need, 5)), 1 if shrunk else bs)
        except Exception as e:  # one failing option must not lose the others' figures; reported and exit 1
            result["errors"][f"{kind}:{name}"] = f"{type(e).__name__}: {e}"[:500]
            gc.collect()
    tr, dc = result["train"], result["decode"]
    result["peft_tokens_per_s_ratio"] = {  # ours / PEFT, same loop, same precision, same run
        p: tr[f"lora/{p}"]["tokens_per_s"] / tr[f"peft/{p}"]["tokens_per_s"]
        for p in speed.PRECISIONS if f"lora/{p}" in tr and f"peft/{p}" in tr}
    result["projection"] = {
        # The pipeline as it is: params.yaml's defaults, generate.batch_size 16, transformers' n-gram ban.
        "default": project(tr, dc, lambda r: all(r.get(k, v) == v for k, v in (
            ("precision", "fp32"), ("compile", False), ("workers", 0), ("group", False), ("batch_size", default_bs),
            ("pin_memory", device == "cuda")))),
        # Options and proposed changes that leave every number as it is (loader workers, pinned memory, decode
        # batch size).
        "same_numbers": project(tr, dc, lambda r: r["precision"] == "fp32" and not r["compile"]
                                and not r.get("group", False)),
        "best": project(tr, dc, lambda r: True),
        "protocol": {"epochs": EPOCHS, "steps_per_epoch": STEPS_PER_EPOCH, "eval_batches_per_epoch": EVAL_BATCHES,
                     "test_mrs": TEST_MRS, "decoded_systems": list(DECODED), "score_first_s": SCORE_FIRST_S,
                     "score_warm_s": SCORE_WARM_S, "score_source": "benchmarks/NOTES.md, 2-core CPU, 2026-11-28",
                     "not_counted": "download, preprocessing, model loading"},
    }
    result["elapsed_s"] = time.perf_counter() - t_start
    check_finite(result)
    from stages.lib.outputs import write_json

    write_json(args.out, result)
    print_table(result)
    return 1 if result["errors"] else 0


def print_table(r: dict) -> None:
    d = r["device"]
    print(f"bench_gpu ({r['mode']}) on {d['type']} {d['name']}, torch {d['torch']}, {r['elapsed_s']:.0f} s")
    print(f"{'train config':34s} {'steps/s':>8s} {'tokens/s':>10s} {'eval/s':>8s} {'peak MiB':>9s} {'pad':>5s}")
    for k, x in r["train"].items():
        print(f"{k:34s} {x['steps_per_s']:8.2f} {x['tokens_per_s']:10.0f} {x['eval_steps_per_s']:8.2f} "
              f"{x['peak_memory_mib']:9.0f} {x['padding_fraction']:5.2f}")
    print(f"{'decode config':34s} {'out/s':>8s} {'measured':>10s} {'630 MRs s':>10s}")
    for k, x in r["decode"].items():
        print(f"{k:34s} {x['outputs_per_s']:8.2f} {x['contexts_measured']:10d} {x['projected_630_s']:10.1f}")
    for k, v in r["peft_tokens_per_s_ratio"].items():
        print(f"tokens/s ours / PEFT ({k}): {v:.3f}")
    for k in ("default", "same_numbers", "best"):
        p = r["projection"][k]
        print(f"projected full protocol, {k}: " + (f"{p['total_s'] / 60:.1f} min {p['configs']}" if "total_s" in p
                                                   else p["missing"]))
    for k, v in {**r["skipped"], **r["errors"]}.items():
        print(f"{'ERROR' if k in r['errors'] else 'skipped'} {k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
