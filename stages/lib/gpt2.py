"""GPT-2 conventions the stages share: token ids, the tokenizer, loading a model safely, the base's identity.

<|endoftext|> (50256) is GPT-2's EOS, the paper format's MR/reference separator, and its padding id: padding is
told apart by length, never by id.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from stages.lib.cli import InputError, RunError

EOS = 50256
PREFIX = "transformer."  # GPT2LMHeadModel's base model; the hub's GPT-2 files hold the base model's keys without it
# Causal-mask constants that checkpoints written by older transformers carry per layer (h.N.attn.bias, a
# (1, 1, n_positions, n_positions) lower triangle, and h.N.attn.masked_bias, a scalar): not weights, and today's
# GPT2Attention builds its mask itself, so their presence or absence changes no output. Accepted for the layers the
# config has; under any other name, or for a layer the config lacks, they are unexpected like any tensor.
_MASK_BUFFER = re.compile(r"transformer\.h\.(\d+)\.(?:attn|crossattention)\.(?:bias|masked_bias)")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from a tokenizer.json; <|endoftext|> is both EOS and pad."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such tokenizer file")
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
    except Exception as e:  # the tokenizers library raises its own exception types
        raise InputError(f"{path}: not a tokenizer.json ({one_line(e)})") from None
    if tok.eos_token_id != EOS:
        raise InputError(f"{path}: <|endoftext|> has id {tok.eos_token_id}, GPT-2's is {EOS}")
    tok.pad_token = tok.eos_token
    return tok


def one_line(e: BaseException | str) -> str:
    """An exception's text on one line (the libraries' messages may span several), for an error's parenthesis."""
    return " ".join(str(e).split())


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


def _layer_count(keys) -> int:
    return len({m.group(1) for k in keys if (m := re.match(r"transformer\.h\.(\d+)\.", k))})


def check_weights(model_dir: str | Path, config: GPT2Config) -> None:
    """model.safetensors holds exactly the tensors a GPT2LMHeadModel built from `config` has, in their shapes, or an
    InputError naming the file and the first tensor that is missing, unexpected or of another shape. Reads the file's
    header only (names and shapes), plus lm_head.weight if a tied model's file carries one.

    - missing: transformers would fill the tensor with random numbers and carry on (its "newly initialized" table);
    - unexpected: weights the config has no place for (more layers than n_layer, another architecture) would be
      dropped; the mask constants of old checkpoints (_MASK_BUFFER) are not weights and are accepted;
    - lm_head.weight: absent from the file when tie_word_embeddings is true (it IS the token embedding); a file that
      carries one anyway must carry the embedding itself, since transformers would silently untie the two otherwise;
      with tie_word_embeddings false it is a weight like any other and must be there.
    """
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    weights, config_file = model_dir / "model.safetensors", model_dir / "config.json"
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{weights}: not a readable safetensors file ({one_line(e)})") from None
    if not any(k.startswith(PREFIX) for k in found):  # the base model's layout, as the hub ships GPT-2
        found = {k if k.startswith("lm_head.") else PREFIX + k: shape for k, shape in found.items()}
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        expected = {k: tuple(t.shape) for k, t in GPT2LMHeadModel(config).state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", True))
    if tied:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not (
        (m := _MASK_BUFFER.fullmatch(k)) and int(m.group(1)) < config.n_layer) and not (tied and k == "lm_head.weight")]
    if missing:
        hint = ""
        if missing[0] == "lm_head.weight":
            hint = f"; {config_file.name} has tie_word_embeddings: false, so the file must hold the output layer"
        elif _layer_count(found) < config.n_layer:
            hint = f"; {config_file.name} has n_layer {config.n_layer}, the file holds {_layer_count(found)} layers"
        raise InputError(f"{weights}: tensor {missing[0]} is missing ({len(missing)} missing in all), "
                         f"{config_file} needs it{hint}")
    if unexpected:
        hint = ""
        if _layer_count(found) > config.n_layer:
            hint = f"; {config_file.name} has n_layer {config.n_layer}, the file holds {_layer_count(found)} layers"
        raise InputError(f"{weights}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all), "
                         f"{config_file} has no place for it{hint}")
    for k, shape in expected.items():
        if found[k] != shape:
            raise InputError(f"{weights}: tensor {k} has shape {list(found[k])}, {config_file} needs {list(shape)}")
    if tied and "lm_head.weight" in found:
        with safe_open(str(weights), framework="pt") as f:  # lm_head.weight keeps its name in either layout
            wte = PREFIX + "wte.weight" if PREFIX + "wte.weight" in set(f.keys()) else "wte.weight"
            if not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor(wte)):
                raise InputError(f"{weights}: tensor lm_head.weight differs from the token embedding, but "
                                 f"{config_file} has tie_word_embeddings: true (one matrix for both)")


def load_model(model_dir: str | Path, dropout: float | None = None) -> GPT2LMHeadModel:
    """A GPT-2 from config.json + model.safetensors (never pickle): the file's tensors exactly the config's
    (check_weights), every weight checked finite; `dropout`, if given, replaces the config's embedding, attention
    and residual dropout probabilities."""
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise InputError(f"{model_dir / name}: no such file")
    try:
        config = GPT2Config.from_json_file(model_dir / "config.json")
    except (ValueError, OSError) as e:
        raise InputError(f"{model_dir / 'config.json'}: not a valid GPT-2 config ({one_line(e)})") from None
    if dropout is not None:
        config.embd_pdrop = config.attn_pdrop = config.resid_pdrop = dropout
    try:
        check_weights(model_dir, config)
    except InputError:
        raise
    except Exception as e:  # a config transformers accepts but cannot build a model from (n_embd % n_head != 0, ...)
        raise InputError(f"{model_dir / 'config.json'}: not a valid GPT-2 config ({type(e).__name__}: "
                         f"{one_line(e)})") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # checked above: its load report could only list the mask constants
    try:
        model, info = GPT2LMHeadModel.from_pretrained(model_dir, config=config, use_safetensors=True,
                                                      output_loading_info=True)
    except Exception as e:  # safetensors' and transformers' own types: truncated data, ...
        raise InputError(f"{model_dir}: cannot load the model ({type(e).__name__}: {one_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # check_weights and transformers must agree; if a future transformers maps names differently, fail, never guess
    left = {kind: sorted(name for k in info.get(kind, ()) if not _MASK_BUFFER.fullmatch(
                name := str(k if isinstance(k, str) else k[0])) and not _MASK_BUFFER.fullmatch(PREFIX + name))
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    for kind, keys in left.items():
        if keys:
            raise InputError(f"{model_dir / 'model.safetensors'}: transformers reports {kind.replace('_', ' ')} "
                             f"{keys[0]} ({len(keys)} in all)")
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
