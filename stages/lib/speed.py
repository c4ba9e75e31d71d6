"""How fast a run goes: params.yaml `speed:` (options that may change the numbers) and `runtime:` (that never do).

The defaults are the authors' protocol (microsoft/LoRA examples/NLG trains and decodes GPT-2 in fp32, in the order
its sampler draws): every option that could change a result is off by default, and what it changes is said below.
Shared by the train and generate stages and by benchmarks/bench_gpu.py, which measures each option.
"""
from __future__ import annotations

import contextlib

import torch

from stages.lib import params as P

PRECISIONS = ("fp32", "tf32", "bf16")
AMPERE = (8, 0)  # TF32 tensor cores and native bf16 arrived with compute capability 8.0 (A100)

# What each option does to the numbers (not only to the speed):
# - precision fp32: IEEE fp32 matmuls everywhere, as the authors. The reference.
# - precision tf32: weights, activations and optimizer state stay fp32, but CUDA matmuls round their inputs to
#   TF32 (10-bit mantissa, fp32 range). Losses and outputs differ from fp32 in the ~3rd-4th significant digit;
#   decoded texts can differ where two beams are near-tied. Changes the numbers.
# - precision bf16: autocast: matmuls and most activations in bfloat16 (8-bit mantissa); weights, gradients and
#   AdamW state stay fp32 (transformers' `bf16=True` is autocast, not a cast of the model). Larger drift than tf32;
#   whether E2E scores stay within seed noise is to be measured, not assumed. Changes the numbers.
# - compile: torch.compile (inductor) fuses kernels; the maths is the same but fused kernels round in a different
#   order, so results match fp32 to float tolerance, not bit for bit. Costs compile time at the start of each run
#   (and a recompile when batch shapes change, once, before shapes go dynamic).
# - runtime.dataloader_workers, runtime.pin_memory: where and how batches are built and copied to the GPU. Same
#   batches, same order (the sampler runs in the main process). No effect on the numbers.
# - group_by_length: transformers' LengthGroupedSampler: batches of similar length (less padding, fewer wasted
#   FLOPs), drawn in a different order from the authors' random sampler. Changes the training trajectory: not the
#   authors' protocol.


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(speed: P.Speed, runtime: P.Runtime, device: str, capability: tuple[int, int] | None = None) -> dict:
    """The speed and runtime settings made concrete for `device` ("cuda" or "cpu"): pin_memory "auto" becomes on
    exactly with CUDA.

    Decision: tf32 and bf16 are refused off CUDA, and on GPUs older than Ampere (`capability`, default: the
    current GPU's), with a ParamError naming speed.precision. On a CPU, TF32 does not exist and bf16 autocast is
    emulated on most CPUs (slower than fp32) while still changing the numbers; silently running fp32 instead would
    make params.yaml lie about what ran. pin_memory: true without CUDA is refused for the same reason.
    """
    cfg = {**speed.model_dump(), "dataloader_workers": runtime.dataloader_workers, "pin_memory": runtime.pin_memory}
    run = dict(cfg)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    if cfg["precision"] != "fp32":
        if device != "cuda":
            raise P.ParamError(f"speed.precision={cfg['precision']} needs a CUDA GPU (Ampere or newer); this run "
                               "is on the CPU: use fp32")
        cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability()
        if cap < AMPERE:
            raise P.ParamError(f"speed.precision={cfg['precision']} needs compute capability >= 8.0 (Ampere); "
                               f"this GPU has {cap[0]}.{cap[1]}: use fp32")
    if cfg["pin_memory"] == "auto":
        run["pin_memory"] = device == "cuda"
    elif cfg["pin_memory"] and device != "cuda":
        raise P.ParamError("runtime.pin_memory=true needs CUDA (pinned memory speeds host-to-GPU copies); "
                           "use auto or false")
    return run


def training_kwargs(run: dict) -> dict:
    """transformers TrainingArguments keyword arguments for a resolve()d config (transformers 5.x names)."""
    return {
        "bf16": run["precision"] == "bf16",  # autocast; fp32 master weights
        # Always explicit: with tf32=None and torch_compile=True transformers switches TF32 on by itself
        # (TrainingArguments.__post_init__, "TF32" step), which would change the numbers behind our back.
        "tf32": run["precision"] == "tf32",
        "torch_compile": run["compile"],
        "dataloader_num_workers": run["dataloader_workers"],
        "dataloader_pin_memory": run["pin_memory"],
        # transformers 5.x replaced `group_by_length=True` with this sampler choice. Our datasets are lists of
        # dicts, so LengthGroupedSampler measures len(example["input_ids"]) itself; `length_column_name` is only
        # read for a datasets.Dataset and is therefore not set.
        "train_sampling_strategy": "group_by_length" if run["group_by_length"] else "random",
    }


def set_tf32(enable: bool) -> tuple[str, str]:
    """TF32 for CUDA matmuls on or off (torch >= 2.9 API; never mixed with the legacy allow_tf32 flags, which
    torch refuses); returns the previous (matmul, cudnn) settings for restore_tf32."""
    prev = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision)
    mode = "tf32" if enable else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.fp32_precision = mode
    return prev


def restore_tf32(prev: tuple[str, str]) -> None:
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision = prev


@contextlib.contextmanager
def precision_context(precision: str, device: str):
    """Run the body at `precision` on `device` ("cuda"/"cpu"): TF32 matmuls on for tf32 and off otherwise (fp32 is
    IEEE even if someone switched TF32 on globally), bf16 autocast for bf16; settings restored on exit.

    No device check here (resolve() does that for the pipeline): the benchmark and the tests use bf16 autocast on
    the CPU to exercise the code path.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    prev = set_tf32(precision == "tf32")
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        restore_tf32(prev)


def compile_for_generation(model, enabled: bool):
    """torch.compile the model's forward for decoding (model.generate keeps working); the model itself returned.

    dynamic=True: beam search calls forward with a KV cache that grows by one position per step, and a
    shape-specialised graph would recompile at every step. Not measured on a GPU yet: bench_gpu.py times it.
    """
    if enabled:
        model.forward = torch.compile(model.forward, dynamic=True)
    return model
