"""GPT-2 conventions the stages share: token ids, the tokenizer, loading a model safely, the base's identity.

<|endoftext|> (50256) is GPT-2's EOS, the paper format's MR/reference separator, and its padding id: padding is
told apart by length, never by id.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from stages.lib.cli import InputError, RunError

EOS = 50256


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from a tokenizer.json; <|endoftext|> is both EOS and pad."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such tokenizer file")
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    except Exception as e:  # the tokenizers library raises its own exception types
        raise InputError(f"{path}: not a tokenizer.json ({e})") from None
    if tok.eos_token_id != EOS:
        raise InputError(f"{path}: <|endoftext|> has id {tok.eos_token_id}, GPT-2's is {EOS}")
    tok.pad_token = tok.eos_token
    return tok


def base_identity(base_dir: Path) -> str:
    """The pretrained model's identity (download's identity.json), stamped into every adapter."""
    path = Path(base_dir) / "identity.json"
    try:
        return json.dumps(json.loads(path.read_text(encoding="utf-8")), sort_keys=True)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the base model's identity ({e})") from None


def nonfinite_tensors(named: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of floating-point tensors holding NaN or ±inf."""
    items = named.items() if isinstance(named, dict) else named
    return [n for n, t in items if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(model: torch.nn.Module, what: str, error=InputError, trainable_only: bool = False) -> None:
    bad = nonfinite_tensors([(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only])
    if bad:
        raise error(f"{what}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]})")


def load_model(model_dir: str | Path, dropout: float | None = None) -> GPT2LMHeadModel:
    """A GPT-2 from config.json + model.safetensors (never pickle), every weight checked finite; `dropout`, if
    given, replaces the config's embedding, attention and residual dropout probabilities."""
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise InputError(f"{model_dir / name}: no such file")
    try:
        config = GPT2Config.from_json_file(model_dir / "config.json")
    except (ValueError, OSError) as e:
        raise InputError(f"{model_dir / 'config.json'}: not a valid GPT-2 config ({e})") from None
    if dropout is not None:
        config.embd_pdrop = config.attn_pdrop = config.resid_pdrop = dropout
    try:
        model = GPT2LMHeadModel.from_pretrained(model_dir, config=config, use_safetensors=True)
    except Exception as e:  # safetensors' and transformers' own types: truncated file, wrong shapes, ...
        raise InputError(f"{model_dir}: cannot load the model ({type(e).__name__}: {e})") from None
    check_finite(model, str(model_dir / "model.safetensors"))
    # transformers derives the loss from the class name, finds none in "GPT2LMHeadModel" and says "`loss_type=None`
    # ... unrecognized" on the first loss; the loss it then uses is this one, so naming it changes no number.
    model.loss_type = "ForCausalLM"
    return model


def load_prepared(data: str | Path, split: str):
    """One split of preprocess's output (an Arrow dataset), non-empty, or an InputError naming its path."""
    import datasets

    path = Path(data) / split
    try:
        table = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{path}: not a preprocess output ({e})") from None
    if len(table) == 0:
        raise InputError(f"{path}: no examples")
    return table


def check_fits(model: GPT2LMHeadModel, n_tokens: int, what: str) -> None:
    """GPT-2 has n_positions learned positions; a longer sequence would index past them."""
    limit = model.config.n_positions
    if n_tokens > limit:
        raise InputError(f"{what}: {n_tokens} tokens > the model's {limit} positions")


def check_loss(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise RunError(f"training loss is {value} at step {step}; stopping (lower the learning rate, or check "
                       "the data and the base model)")


def collate(examples: list[dict]) -> dict:
    """Right-pad a batch. Labels: -100 on the context and on padding (found by length), so the completion's
    final EOS keeps its label: masking by `id == pad_id` would drop it and the model would never learn to stop."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), EOS, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n, c = len(e["input_ids"]), e["n_context"]
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        labels[i, c:n] = ids[i, c:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
