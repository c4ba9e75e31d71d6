"""export_peft: write our LoRA adapter as a PEFT checkpoint, loadable with `PeftModel.from_pretrained`.

    python -m stages.tools.export_peft --adapter models/lora-s110/adapter.safetensors --base models/base --out DIR

DIR gets adapter_config.json and adapter_model.safetensors; then, with transformers and peft:
`PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(<the base>), DIR)` computes what our adapted model
computes. Not a DVC stage: a tool to take a trained adapter elsewhere.

The mapping is exact, not an approximation. Ours (stages/lib/lora.py) gives each target t of the fused c_attn its own
A_t (r, d) and B_t (d, r), added to t's column block: y[:, block_t] += (alpha / r) · x A_tᵀ B_tᵀ. PEFT's LoRA on a
layer is one pair A (R, d_in), B (d_out, R): y += (alpha_P / R) · x Aᵀ Bᵀ. With the T targets of c_attn,
R = T·r, A = [A_t stacked] (T·r, d) and B (3d, T·r) block-diagonal, B[block_t, slot_t] = B_t and zero elsewhere
(so an untargeted slice, k for [q, v], gets exactly nothing), x Aᵀ Bᵀ is, block by block, x A_tᵀ B_tᵀ. The scale
must stay alpha / r, hence alpha_P = T · alpha (paper's [q, v]: rank 8, alpha 64). o is attn.c_proj with one
pair: it maps as is. GPT-2's Conv1D stores W as (d_in, d_out), so PEFT needs fan_in_fan_out=True; its lora_A /
lora_B are nn.Linear weights, (R, d_in) and (d_out, R), our layout already.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from stages.lib import cli, lora
from stages.lib.cli import InputError
from stages.lib.outputs import atomic_dir
from stages.lib.gpt2 import base_identity, load_model

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MODULES = {"c_attn": "attn.c_attn", "c_proj": "attn.c_proj"}  # PEFT target suffixes; mlp.c_proj stays untouched
QKV = ("q", "k", "v")


class ExportError(InputError):
    pass


def peft_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT's tensors for the LoRA in `model`, keyed as PEFT saves them, and each module's PEFT rank."""
    tensors, ranks = {}, {}
    for name, layer in model.named_modules():
        if not isinstance(layer, lora.LoRAConv1D):
            continue
        d_out = layer.base.weight.shape[1]  # Conv1D weight: (d_in, d_out); c_attn: d_out = 3d = [q | k | v]
        targets = list(layer.blocks)  # canonical order (lora.TARGETS); A's row slots follow it
        r = layer.rank
        a = torch.cat([layer.lora_A[t].detach() for t in targets])  # (T·r, d_in)
        b = torch.zeros(d_out, len(targets) * r, dtype=a.dtype)  # (d_out, T·r): zero outside each target's block
        for i, t in enumerate(targets):
            lo, hi = layer.blocks[t]
            b[lo:hi, i * r:(i + 1) * r] = layer.lora_B[t].detach()
        # PEFT's saved keys: "base_model.model." + the module's name + ".lora_A.weight" (no adapter name).
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.cpu().contiguous()
        ranks[name.rsplit(".", 1)[-1]] = len(targets) * r
    return tensors, ranks


def peft_config(cfg: dict, ranks: dict[str, int], identity: dict) -> dict:
    """adapter_config.json for PEFT's LoraConfig; alpha scaled with the rank so that alpha_P / R = alpha / r."""
    r, alpha = cfg["rank"], cfg["alpha"]
    modules = sorted(ranks)  # "c_attn", "c_proj"
    # One module kind: plain r / lora_alpha. Both (targets with o and some of q, k, v): c_proj keeps (r, alpha),
    # c_attn gets its larger rank through PEFT's rank_pattern / alpha_pattern (regexes on the module name).
    main = modules[0] if len(modules) == 1 else "c_proj"
    rank_pattern = {MODULES[m]: ranks[m] for m in modules if m != main}
    alpha_pattern = {MODULES[m]: alpha * ranks[m] / r for m in modules if m != main}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": identity.get("name"), "revision": identity.get("revision"),
        "target_modules": [MODULES[m] for m in modules],
        "r": ranks[main], "lora_alpha": alpha * ranks[main] / r, "lora_dropout": cfg["dropout"],
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": True,  # GPT-2 Conv1D: W is (d_in, d_out)
        "bias": "none", "lora_bias": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }


def load_ours(adapter: Path, base: Path) -> GPT2LMHeadModel:
    """The base with our adapter applied (unmerged), after stages.lib.lora's format, base-identity and shape checks."""
    for f in ("config.json", "model.safetensors", "identity.json"):
        if not (base / f).is_file():
            raise ExportError(f"--base: {base / f}: no such file (expected the download stage's model directory)")
    if not adapter.is_file():
        raise ExportError(f"--adapter: {adapter}: no such file")
    try:  # the stages' loader: the weights exactly the config's and finite, or one line naming the file and tensor
        model = load_model(base)
    except InputError as e:
        raise ExportError(f"--base: {e}") from None
    try:
        lora.load_adapter(model, adapter, base=base_identity(base))
    except (ValueError, TypeError) as e:
        raise ExportError(f"--adapter: {e}") from None
    return model.eval()


def max_logit_diff(ours: GPT2LMHeadModel, base: Path, peft_dir: Path) -> tuple[float, float]:
    """Load `peft_dir` with PEFT onto a fresh base: largest |logit difference| to ours on a fixed input, and the
    largest |logit| of ours (the scale float32 rounding is relative to)."""
    from peft import PeftModel

    with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x: nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        theirs = PeftModel.from_pretrained(load_model(base), peft_dir).eval()
    ids = torch.arange(32).unsqueeze(0) * 97 % ours.config.vocab_size  # (1, 32): any fixed token ids
    with torch.no_grad():
        want = ours(ids).logits
        return float((want - theirs(ids).logits).abs().max()), float(want.abs().max())


def export(adapter: Path, base: Path, out: Path, verify: bool = True, rtol: float = 1e-4) -> float | None:
    """Write the PEFT checkpoint to `out` (whole or not at all); the verified max logit difference, if verified."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / CONFIG).is_file())):
        raise ExportError(f"--out: {out} exists and is not a PEFT adapter directory; refusing to replace it")
    model = load_ours(adapter, base)
    tensors, ranks = peft_tensors(model)
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise ExportError(f"--adapter: {adapter}: non-finite weights in {len(bad)} tensors, first {bad[0]}")
    config = peft_config(lora.lora_config(model), ranks, json.loads((base / "identity.json").read_text()))
    diff = None
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: header bytes are fixed
        if verify:
            diff, scale = max_logit_diff(model, base, tmp)
            # Same maths in another order: float32 rounding only, relative to the logits' size. A wrong layout,
            # scale or block is off by the size of the update itself.
            if not diff <= rtol * max(1.0, scale):  # `not <=` also catches NaN
                raise ExportError(f"PEFT's logits differ from ours by {diff:.3g} (largest logit {scale:.3g}): "
                                  "export not written")
    return diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, required=True,
                    help="our adapter (train-lora's models/lora-s<seed>/adapter.safetensors)")
    ap.add_argument("--base", type=Path, required=True, help="the base model directory it was trained on")
    ap.add_argument("--out", type=Path, required=True, help="directory for the PEFT checkpoint")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the check (which needs peft) that PEFT loads the export and its logits equal ours")
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()  # two model loads of a few seconds: the bars would be most of the output
    verify = not args.no_verify
    if verify:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ExportError("verification needs the peft package (pip install peft==0.21.2), "
                              "or pass --no-verify") from None
    diff = export(args.adapter, args.base, args.out, verify=verify)
    checked = f"PEFT loads it, max |logit difference| to ours {diff:.2g}" if verify else "not verified"
    print(f"export_peft: {args.adapter} -> {args.out}/{{{CONFIG},{WEIGHTS}}} ({checked})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("export_peft", main))
