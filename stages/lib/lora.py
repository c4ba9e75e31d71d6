"""LoRA for GPT-2 that adapts exactly the paper's matrices: W_q and W_v inside the fused `attn.c_attn`.

Hu et al. 2021 (LoRA), section 4.1: a frozen weight W0 gets a trainable low-rank update, h = x W0 + x ΔW with
ΔW = (alpha / r) · (B A)ᵀ in GPT-2's x @ W layout, A: (r, d_in) Kaiming-uniform, B: (d_out, r) zeros, so training
starts from the base model exactly. Section 4.2 / Table 11 (E2E, GPT-2 M): only W_q and W_v, r_q = r_v = 4,
alpha = 32. Table 5 ablates the choice of W_q, W_k, W_v, W_o, so all four are targets here.

GPT-2 computes q, k and v with ONE fused `Conv1D` (`attn.c_attn`: weight (d, 3d), columns [q | k | v],
y = x @ W + b). PEFT can only target the whole c_attn (one A shared by q, k and v: a different model with the same
parameter count); microsoft/LoRA's MergedLinear targets slices, but with a transpose bug (its issue #103, fixed in
#105). Here every target has its own A_t, B_t and its update is added to its own column block of c_attn's output;
k's block is never touched.

Parameter count, GPT-2 Medium (24 layers, d = 1024), r = 4 on q and v: 24 · 2 · (4·1024 + 1024·4) = 393,216.
The paper's Table 3 prints 0.35M; microsoft/LoRA issue #172 also counts 0.39M.

Accepts any transformers GPT-2 model whose attention blocks are `GPT2Attention` (GPT2LMHeadModel, GPT2Model, ...);
cross-attention blocks are refused. Parameter names of the adapter contain "lora" (`...attn.c_attn.lora_A.q`); the
wrapped base layer moves to `...attn.c_attn.base` until `merge_lora` puts the original Conv1D back.
"""
from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

from stages.lib.params import TARGETS, check_targets  # canonical order; q, k, v in attn.c_attn, o attn.c_proj

FORMAT = "lora-e2e-adapter"
FORMAT_VERSION = "2"  # 2: all metadata as sorted JSON under META_KEY (byte-identical files)
META_KEY = "lora_e2e"


class LoRAConv1D(nn.Module):
    """A frozen GPT-2 Conv1D plus one low-rank update per target column block of its output.

    `blocks` maps a target name to its output columns, e.g. c_attn with d = 1024: {"q": (0, 1024), "v": (2048, 3072)}.
    """

    def __init__(self, base: Conv1D, blocks: dict[str, tuple[int, int]], rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.blocks = dict(blocks)
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = self.alpha / rank  # section 4.1: scale ΔW x by alpha / r, so alpha need not be retuned per r
        # One dropout on the layer input, shared by all targets of the layer, as loralib's MergedLinear.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d_in = base.weight.shape[0]  # Conv1D weight is (d_in, d_out): the transpose of nn.Linear's
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t, (lo, hi) in self.blocks.items():
            a = torch.empty(rank, d_in, **like)  # A_t: (r, d_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as loralib (and nn.Linear's default init)
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(torch.zeros(hi - lo, rank, **like))  # B_t: (d_out_t, r); zero => ΔW = 0

    def delta_weight(self, t: str) -> torch.Tensor:
        """ΔW_t in the base layer's (d_in, d_out_t) layout, x @ ΔW_t = scaling · x Aᵀ Bᵀ; at least fp32."""
        dtype = torch.promote_types(self.lora_A[t].dtype, torch.float32)  # half precision: round once, at merge
        return self.scaling * (self.lora_B[t].to(dtype) @ self.lora_A[t].to(dtype)).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., d_out), e.g. c_attn: (batch, seq, 3d) = [q | k | v]; contiguous
        y2 = y.view(-1, y.shape[-1])  # (n, d_out), n = batch · seq; a view, so writes into y2 land in y
        x2 = self.dropout(x).reshape(-1, x.shape[-1])  # (n, d_in)
        # All targets' down-projections in one matmul: (n, d_in) @ (d_in, T·r) -> (n, T·r). Few, larger kernels
        # matter on CPU, where each op is a thread synchronisation.
        u = F.linear(x2, torch.cat(list(self.lora_A.values())))
        for i, (t, (lo, hi)) in enumerate(self.blocks.items()):
            # y[:, lo:hi] += scaling · u_t B_tᵀ: one in-place GEMM writing only t's columns; no full-width,
            # zero-padded delta is built. In place is safe: the base addmm's backward needs its inputs, not y.
            # Under bf16 autocast y and u are bf16 while B stays fp32: addmm_ (in place, not autocast) needs one dtype.
            y2[:, lo:hi].addmm_(u[:, i * self.rank:(i + 1) * self.rank].to(y2.dtype), self.lora_B[t].T.to(y2.dtype),
                                alpha=self.scaling)
        return y

    def extra_repr(self) -> str:
        return f"targets={list(self.blocks)}, rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_p}"


def _attention_blocks(model: nn.Module) -> list[GPT2Attention]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers GPT-2 model, got {type(model).__name__}")
    blocks = [m for m in model.modules() if isinstance(m, GPT2Attention)]
    if not blocks:
        raise TypeError(f"model: expected a GPT-2 model (GPT2LMHeadModel, GPT2Model), "
                        f"{type(model).__name__} has no GPT2Attention block")
    for attn in blocks:
        if attn.is_cross_attention:
            raise ValueError("model: GPT-2 cross-attention blocks are not supported")
    return blocks


def _lora_layers(model: nn.Module) -> dict[str, LoRAConv1D]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAConv1D)}


def check_args(rank, alpha, dropout, targets) -> tuple[str, ...]:
    """Validate LoRA's settings (TypeError/ValueError naming the argument); targets in canonical order."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__} {rank!r}")
    if rank <= 0:
        raise ValueError(f"rank: must be > 0, got {rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: must be a number in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not isinstance(targets, (tuple, list, set, frozenset)) \
            or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets: expected a tuple of names from {TARGETS}, got {targets!r}")
    try:
        targets = tuple(check_targets(list(targets)))  # the rule params.yaml's lora.targets obeys too
    except ValueError as e:
        raise ValueError(f"targets: {e}") from None
    return tuple(t for t in TARGETS if t in targets)


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: tuple[str, ...] = ("q", "v")) -> nn.Module:
    """Freeze `model` and add LoRA to the `targets` (subset of q, k, v, o) of every attention block, in place."""
    targets = check_args(rank, alpha, dropout, targets)
    blocks = _attention_blocks(model)
    if _lora_layers(model):
        raise ValueError("model: LoRA is already added; merge_lora it first or use a fresh model")
    for attn in blocks:  # check everything before changing anything
        d = attn.embed_dim
        if not (isinstance(attn.c_attn, Conv1D) and isinstance(attn.c_proj, Conv1D)
                and tuple(attn.c_attn.weight.shape) == (d, 3 * d) and tuple(attn.c_proj.weight.shape) == (d, d)):
            raise TypeError(f"model: attention projections are not GPT-2's Conv1D of shapes ({d}, {3 * d}) and "
                            f"({d}, {d}): c_attn {attn.c_attn}, c_proj {attn.c_proj}")
    model.requires_grad_(False)  # the pretrained weights stay frozen (section 4.1); only A and B train
    for attn in blocks:
        d = attn.embed_dim
        qkv = {t: (i * d, (i + 1) * d) for i, t in enumerate(("q", "k", "v")) if t in targets}
        if qkv:
            attn.c_attn = LoRAConv1D(attn.c_attn, qkv, rank, alpha, dropout)
        if "o" in targets:
            attn.c_proj = LoRAConv1D(attn.c_proj, {"o": (0, d)}, rank, alpha, dropout)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold scaling · (B A)ᵀ into each base weight and put the original Conv1D back: a plain GPT-2 model (in place).

    Zero added inference latency (section 4.1). The merged model's parameters stay frozen (requires_grad False).
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA to merge")
    with torch.no_grad():
        for name, layer in layers.items():
            w = layer.base.weight  # (d_in, d_out); untargeted columns are not written at all
            for t, (lo, hi) in layer.blocks.items():
                delta = layer.delta_weight(t)  # (d_in, hi - lo), fp32 or wider: sum there and round once
                w[:, lo:hi] = (w[:, lo:hi].to(delta.dtype) + delta).to(w.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
    return model


def lora_config(model: nn.Module) -> dict:
    """rank, alpha, dropout and targets of the LoRA in `model` (ValueError if it has none)."""
    layers = list(_lora_layers(model).values())
    if not layers:
        raise ValueError("model: has no LoRA")
    first = layers[0]
    targets = tuple(t for t in TARGETS if any(t in layer.blocks for layer in layers))
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout_p, "targets": targets}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed as in `model.state_dict()`; restore with load_state_dict(sd, strict=False)."""
    keys = {f"{name}.{p}" for name, layer in _lora_layers(model).items() for p, _ in layer.named_parameters()
            if p.startswith("lora_")}
    return {k: v for k, v in model.state_dict().items() if k in keys}


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: nn.Module, path: str | Path, base: str) -> None:
    """Write the adapter as safetensors, with its settings and the base model's identity (`base`) as metadata."""
    from safetensors.torch import save_file

    if not isinstance(base, str) or not base:
        raise ValueError(f"base: expected a non-empty identity string of the base model, got {base!r}")
    cfg = lora_config(model)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rank": str(cfg["rank"]),
            "alpha": repr(cfg["alpha"]), "dropout": repr(cfg["dropout"]), "targets": ",".join(cfg["targets"]),
            "base": base}
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    # safetensors writes metadata from a Rust HashMap, in a different order in every process: one key holding
    # sorted JSON keeps the file's bytes (and so DVC's hash of models/lora) identical for identical weights.
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def load_adapter(model: nn.Module, path: str | Path, base: str | None = None) -> nn.Module:
    """Load an adapter saved by save_adapter into `model` (adding LoRA with the file's settings if it has none).

    Every fault of the file is a ValueError naming it (FileNotFoundError if there is none): a truncated or corrupt
    file (safetensors' own error types, caught before `model` changes), metadata or tensors not an adapter's."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no adapter file at {path}")
    try:  # read whole before touching the model: a file cut short fails here, not half-way through add_lora
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY, "{}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable adapter file ({' '.join(str(e).split())})") from None
    try:
        meta = json.loads(raw)
        assert isinstance(meta, dict)
    except (ValueError, AssertionError):
        raise ValueError(f"{path}: bad adapter metadata (not a JSON object): {raw[:80]!r}") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format is {meta.get('format')!r} version {meta.get('format_version')!r}, "
                         f"expected {FORMAT!r} version {FORMAT_VERSION!r}")
    try:
        file_cfg = {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]), "dropout": float(meta["dropout"]),
                    "targets": tuple(meta["targets"].split(","))}
        file_base = meta["base"]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: bad adapter metadata ({e!r}): {meta}") from None
    if base is not None and file_base != base:
        raise ValueError(f"base: adapter {path} was trained on {file_base!r}, the model is {base!r}")
    if _lora_layers(model):
        have = lora_config(model)
        for field in ("rank", "alpha", "targets"):
            if have[field] != file_cfg[field]:
                raise ValueError(f"{field}: adapter {path} has {file_cfg[field]!r}, the model has {have[field]!r}")
    else:
        add_lora(model, **file_cfg)
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    for k, shape in expected.items():
        if tensors[k].shape != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model has {tuple(shape)}")
    model.load_state_dict(tensors, strict=False)
    return model
