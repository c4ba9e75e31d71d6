"""params.yaml, typed: one pydantic model per section, validated whole before any stage does any work.

Every stage validates the whole file (an unknown key anywhere, a wrong type, a non-finite number or a value out of
range is one error line naming `section.key`), then reads only the keys it declares in dvc.yaml through the views
at the end of this module. tests/test_params_map.py checks, key by key, that what a stage reads here is exactly
what dvc.yaml declares for it, and that `dvc status` reruns exactly those stages.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError, create_model,
                      model_validator)

from stages.lib.cli import InputError

METHODS = ("lora", "full")


class ParamError(InputError):
    """A parameter has a value the pipeline cannot use; the message names it."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `1e-08` (what `dvc exp run -S authors.train.adam_epsilon=1e-8`
    writes)
    is a number, as DVC itself reads it, not the string YAML 1.1 makes of an exponent without a dot."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load(path: str | Path = "params.yaml") -> dict:
    """params.yaml as plain data (not validated: see `validate`)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: no such file (run the stage from the project root)")
    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.load(f, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ParamError(f"{path}: not UTF-8") from None
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


# --- value types --------------------------------------------------------------------------------------------------

def _ids(what: str, empty_ok: bool = False):
    """A list of distinct integers >= 0 (non-empty unless `empty_ok`): seeds (a duplicate would count twice in a
    mean), token ids."""
    def check(value):
        if not (isinstance(value, list) and (value or empty_ok)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
            raise ValueError(f"must be a {'' if empty_ok else 'non-empty '}list of {what} (integers >= 0), "
                             f"got {value!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicates in {value}: each must appear once")
        return value
    return Annotated[list[int], PlainValidator(check)]


def _choice(*allowed):
    """One of `allowed`, compared with its type: 1 is not true (pydantic's Literal takes 1 for True)."""
    def check(value):
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ValueError(f"must be one of {list(allowed)}, got {value!r}")
        return value
    return Annotated[Any, PlainValidator(check)]


def _not_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]
Path_ = Annotated[str, AfterValidator(_not_empty)]


# LoRA's possible targets, in canonical order: q, k, v (slices of the fused c_attn) and o (attn.c_proj), Table 5.
TARGETS = ("q", "k", "v", "o")
LAYOUTS = ("paper", "equals", "li-liang")  # the input layouts preprocess writes and a recipe picks from


def check_targets(targets: list[str]) -> list[str]:
    """A non-empty list of distinct TARGETS (stages/lib/lora.py takes them in any order)."""
    if not targets:
        raise ValueError(f"empty; choose from {TARGETS}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown {unknown}; choose from {TARGETS}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"duplicates in {targets}")
    return targets


class Section(BaseModel):
    """A params.yaml section: strict types (true is not 1, "1" is not 1), finite numbers, no unknown keys."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def overrides_of(model: type[Section]) -> type[Section]:
    """The same keys, each optional: what a method may set for itself over its recipe's (`full.train`)."""
    fields = {name: (Optional[Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation], None)
              for name, f in model.model_fields.items()}
    return create_model(f"{model.__name__}Overrides", __base__=Section, **fields)


# --- sections -----------------------------------------------------------------------------------------------------

class Data(Section):
    source: Path_


class Model(Section):
    source: Path_


class Preprocess(Section):
    max_length: Annotated[int, Field(ge=8)]


class Train(Section):
    seeds: _ids("seeds")
    processes: Annotated[int, Field(ge=1, le=1024)]


class Loop(Section):
    """A recipe's training loop (Table 11 for the authors'); a method's `train` mapping may set any of these."""
    epochs: Annotated[float, Field(gt=0, le=10_000)]
    batch_size: Annotated[int, Field(ge=1)]
    label_smoothing: Probability
    warmup_steps: NonNegInt
    max_grad_norm: Annotated[float, Field(ge=0)]
    adam_epsilon: Positive
    gpt2_dropout: Probability
    optimizer: Literal["authors", "torch"]
    sampler: Literal["authors", "random"]


class Decode(Section):
    """A recipe's decoding (Table 11 for the authors'); a method's `generate` mapping may set any of these."""
    search: Literal["authors", "transformers", "li-liang"]
    eos_ids: _ids("token ids")
    num_beams: Annotated[int, Field(ge=1)]
    length_penalty: float
    no_repeat_ngram_size: NonNegInt
    max_new_tokens: Annotated[int, Field(ge=1)]
    early_stopping: _choice(True, False, "never")
    banned_ids: _ids("token ids", empty_ok=True)

    @model_validator(mode="after")
    def _what_each_search_can_do(self):
        if self.banned_ids and self.search == "authors":
            raise ValueError("banned_ids needs search: transformers or li-liang; gpt2_beam.py bans no tokens")
        if self.search == "li-liang":
            if len(self.eos_ids) != 1:
                raise ValueError(f"search li-liang stops at one eos id (their generate()'s eos_token_id), got "
                                 f"eos_ids {self.eos_ids}")
            if self.no_repeat_ngram_size or self.early_stopping == "never":
                raise ValueError("search li-liang takes no_repeat_ngram_size 0 and early_stopping true or false, as "
                                 "their generate() does")
        return self


LoopOverrides, DecodeOverrides = overrides_of(Loop), overrides_of(Decode)


class Recipe(Section):
    """How a method's runs are trained and decoded: `authors` (the LoRA authors', Table 11) or `li_liang` (Li &
    Liang's fine-tuning as their code ran it); a method names its recipe in `<method>.recipe`."""
    layout: Literal[LAYOUTS]
    pad_token: bool
    train: Loop
    generate: Decode


class Method(Section):
    recipe: Literal["authors", "li_liang"]
    lr: Positive
    weight_decay: Annotated[float, Field(ge=0)]
    train: LoopOverrides = LoopOverrides()
    generate: DecodeOverrides = DecodeOverrides()


class Lora(Method):
    rank: Annotated[int, Field(ge=1)]
    alpha: Positive
    dropout: Probability
    targets: Annotated[list[str], AfterValidator(check_targets)]


class Full(Method):
    pass


class Speed(Section):
    """Options for speed that may change the numbers (stages/lib/speed.py says how each does)."""
    precision: Literal["fp32", "tf32", "bf16"]
    compile: bool
    group_by_length: bool


class Score(Section):
    mode: Literal["auto", "perl", "python"]


class Runtime(Section):
    """How a run uses the machine, never what it computes: no stage declares these, so changing one reruns
    nothing (tests/test_params_map.py; outputs are byte-identical across them, tests/test_train_generate.py)."""
    dataloader_workers: NonNegInt
    pin_memory: _choice("auto", True, False)
    checkpoint_steps: NonNegInt
    generate_batch_size: Annotated[int, Field(ge=1)]


class Params(Section):
    protocol: Literal["authors", "e2e"]
    data: Data
    model: Model
    preprocess: Preprocess
    train: Train
    lora: Lora
    full: Full
    authors: Recipe
    li_liang: Recipe
    speed: Speed
    score: Score
    runtime: Runtime


# --- errors: one line naming section.key --------------------------------------------------------------------------

_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}
_TYPES = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
          "list_type": "a list", "model_type": "a mapping", "dict_type": "a mapping"}


def _expected(text: str) -> list:
    """pydantic's "'a', 'b' or True" -> ['a', 'b', True], as the old messages printed the allowed values."""
    return [yaml.safe_load(part.strip().replace("'", '"')) for part in re.split(r",| or ", text)]


def message(err: dict, prefix: str = "") -> str:
    """One pydantic error as `section.key must be ..., got ...`."""
    loc = [str(x) for x in err["loc"] if not isinstance(x, int)]
    key = ".".join(([prefix] if prefix else []) + loc) or "params.yaml"
    got = err.get("input")
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _BOUNDS:
        op, name = _BOUNDS[kind]
        return f"{key} must be {op} {ctx[name]:g}, got {got!r}"
    if kind == "finite_number":
        return f"{key} must be a finite number, got {got!r}"
    if kind in _TYPES:
        return f"{key} must be {_TYPES[kind]}, got {got!r}"
    if kind == "literal_error":
        return f"{key} must be one of {_expected(ctx['expected'])}, got {got!r}"
    if kind == "extra_forbidden":
        known = ", ".join(sorted(_section(loc[:-1]).model_fields))
        return f"unknown parameter {key} (known{' in ' + '.'.join(loc[:-1]) if loc[:-1] else ''}: {known})"
    if kind == "missing":
        return f"missing parameter {key}"
    if kind == "too_short":
        return f"{key} must be a non-empty list, got {got!r}"
    if kind == "value_error":
        text = err["msg"].removeprefix("Value error, ")
        return f"{key} {text}" if text.startswith("must be") else f"{key}: {text}"
    return f"{key}: {err['msg']}, got {got!r}"


def _section(loc: list[str]) -> type[Section]:
    """The section model at `loc` in Params (e.g. ["train", "full"] -> LoopOverrides)."""
    model = Params
    for part in loc:
        model = model.model_fields[part].annotation
    return model


def _raise(e: ValidationError, prefix: str = ""):
    errors = sorted(e.errors(), key=lambda err: err["type"] == "missing")  # a wrong value before what is missing
    raise ParamError(message(errors[0], prefix)) from None


def validate(params: dict) -> Params:
    """The whole of params.yaml, typed; the first problem as a ParamError naming its key."""
    try:
        p = Params.model_validate(params)
    except ValidationError as e:
        _raise(e)
    for method in METHODS:  # a method's own keys laid over the shared ones must make a valid whole too
        loop(p, method), decode(p, method)
    return p


def read(path: str | Path = "params.yaml") -> Params:
    return validate(load(path))


# --- what each stage reads: the views dvc.yaml's params lists declare ---------------------------------------------

def recipe(p: Params, method: str) -> Recipe:
    """The recipe `method` follows; the pretrained base is decoded as the authors' recipe decodes."""
    return p.authors if method == "base" else getattr(p, getattr(p, method).recipe)


def loop(p: Params, method: str) -> Loop:
    """The training loop `method` runs: its recipe's, with the keys its own `train` mapping sets."""
    own = getattr(p, method)
    return _merged_as(recipe(p, method).train, own.train, Loop, f"{method}.train", own.recipe)


def decode(p: Params, method: str) -> Decode:
    """The decoding `method` ("base", "lora" or "full") uses: its recipe's, with the keys its `generate` sets."""
    if method == "base":
        return p.authors.generate
    own = getattr(p, method)
    return _merged_as(recipe(p, method).generate, own.generate, Decode, f"{method}.generate", own.recipe)


def key_of(p: Params, method: str, section: str, key: str) -> str:
    """The params key a method's `section` ("train" or "generate") setting `key` comes from, for error messages."""
    own = getattr(p, method)
    return (f"{method}.{section}.{key}" if getattr(getattr(own, section), key) is not None
            else f"{own.recipe}.{section}.{key}")


def _merged_as(base: Section, mine: Section, model: type[Section], where: str, recipe_name: str) -> Section:
    """A recipe's section with the keys a method's own mapping sets laid over it; an error names the key."""
    own = mine.model_dump(exclude_none=True)
    try:
        return model.model_validate({**base.model_dump(), **own})
    except ValidationError as e:
        raise ParamError(message(e.errors()[0], where) + f" (over the {recipe_name} recipe)") from None
