"""Reading params.yaml: each stage takes only the keys it declares in dvc.yaml, validated before any work.

Errors name the parameter as `section.key` so that the fix (`dvc exp run -S section.key=...` or an edit of
params.yaml) is obvious.
"""
from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from stages.lib.cli import InputError


class ParamError(InputError):
    """A parameter has a value the pipeline cannot use; the message names it."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `1e-08` (what `dvc exp run -S train.adam_epsilon=1e-8` writes)
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


def warn_unknown(params: dict, section: str, known: Iterable[str]) -> list[str]:
    """Warn (stderr) about keys of `section` that no stage reads: `lora.rnak=8` would otherwise do nothing."""
    node = params.get(section)
    if not isinstance(node, dict):
        return []
    known = set(known)
    unknown = sorted(k for k in node if k not in known)
    for k in unknown:
        print(f"warning: params.yaml: unknown parameter {section}.{k} is ignored "
              f"(known in {section}: {', '.join(sorted(known))})", file=sys.stderr)
    return unknown


def get(params: dict, key: str):
    """params['a']['b'] for key 'a.b'; a missing key is a ParamError naming it."""
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamError(f"params.yaml: missing parameter {key}")
        node = node[part]
    return node


def number(params: dict, key: str, *, kind=float, min=None, max=None, min_inclusive=True, max_inclusive=True):
    """A validated finite number: right type (bools refused) and within [min, max] (bounds optional)."""
    value = get(params, key)
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ParamError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):  # nan passes every comparison below; inf overflows step counts
        raise ParamError(f"{key} must be a finite number, got {value!r}")
    if min is not None and (value < min or (value == min and not min_inclusive)):
        raise ParamError(f"{key} must be {'>=' if min_inclusive else '>'} {min}, got {value!r}")
    if max is not None and (value > max or (value == max and not max_inclusive)):
        raise ParamError(f"{key} must be {'<=' if max_inclusive else '<'} {max}, got {value!r}")
    return kind(value)


def distinct_ints(params: dict, key: str, what: str) -> list[int]:
    """A non-empty list of distinct integers >= 0 (seeds, token ids); anything else is a ParamError naming `key`."""
    value = get(params, key)
    if not (isinstance(value, list) and value
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ParamError(f"{key} must be a non-empty list of {what} (integers >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise ParamError(f"{key}: duplicates in {value}: each must appear once")
    return value


def choice(params: dict, key: str, allowed):
    value = get(params, key)
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):  # 1 is not True
        raise ParamError(f"{key} must be one of {list(allowed)}, got {value!r}")
    return value


def with_overrides(params: dict, method: str, shared: str, allowed: Iterable[str]) -> dict:
    """params with `<method>.<shared>` (e.g. full.train) laid over the shared section `<shared>` (train): how one
    method runs under another recipe (Li & Liang's for the FT row) without touching the other's settings."""
    node = params.get(method) or {}
    overrides = node.get(shared) if isinstance(node, dict) else None
    if overrides is None:
        return params
    if not isinstance(overrides, dict):
        raise ParamError(f"{method}.{shared} must be a mapping of {shared} keys, got {overrides!r}")
    unknown = sorted(k for k in overrides if k not in set(allowed))
    if unknown:
        raise ParamError(f"{method}.{shared}.{unknown[0]}: not a {shared} key that {method} may override "
                         f"(allowed: {', '.join(sorted(allowed))})")
    return {**params, shared: {**(params.get(shared) or {}), **overrides}}
