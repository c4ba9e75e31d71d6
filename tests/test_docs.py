"""The docs name only what exists: every `data/`, `models/` or `metrics/` path that the README, a README beside the
data, or a module docstring names is something dvc.yaml produces or the repository holds, and every params key
they name (`lora.rank`, `-S +full.train.batch_size=12`) is one params.yaml has.
"""
from __future__ import annotations

import ast
import fnmatch
import re
import typing
from pathlib import Path

import pytest
import yaml

from stages.lib import params as P
from test_dvc_deps import expand

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(ROOT.glob("*/README.md")), *sorted(ROOT.glob("data/*/README.md"))]
MODULES = sorted(p for p in (ROOT / "stages").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
# A path of ours: not part of a longer path (microsoft/LoRA's examples/NLG/data/e2e is theirs).
PATH = re.compile(r"(?<![\w/.~-])((?:data|models|metrics)/[\w.<>{}*@,/…-]*[\w>}*/…])")
# A params key in backticks, as docs write them: `lora.rank`, `train.seeds: [...]`, `+full.train.epochs=1`
KEY = re.compile(r"`[+]?((?:<\w+>|[a-z_]+)(?:\.(?:<\w+>|[a-z_]+))+)(?:[:=][^`]*)?`")
SET = re.compile(r"-S '?[+]?([a-z_]+(?:\.[a-z_]+)*)=")  # `dvc exp run -S key=value` in a command
FILE_SUFFIXES = (".py", ".json", ".safetensors", ".txt", ".yaml", ".csv", ".md", ".lock", ".png", ".tsv", ".gz", ".jar",
                 ".bin", ".html", ".pl", ".sh")
PLACEHOLDERS = {"<recipe>": ("authors", "li_liang"), "<method>": ("lora", "full")}
MISTAKES = {"lora.rnak"}  # a typo the README shows on purpose (what an unknown key gets)
FORMER = {"generate"}  # sections that are gone (they moved into the recipes): a mention of one is stale


def texts() -> list[tuple[str, str]]:
    """(where, text) of every README and every module docstring."""
    out = [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in DOCS]
    for p in MODULES:
        doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
        if doc:
            out.append((f"{p.relative_to(ROOT)} (docstring)", doc))
    return out


def produced() -> list[str]:
    """Every path dvc.yaml writes (outputs, metrics, plots), for the seeds and methods of params.yaml."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = set()
    for stage in expand(stages).values():
        for kind in ("outs", "metrics", "plots"):
            found |= {entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get(kind, [])}
    return sorted(found)


def pattern(mention: str) -> str:
    """A mention as a glob: `<run>`, `{train,valid}`, `…` and the like stand for anything."""
    return re.sub(r"<[^>]*>|\{[^}]*\}|…", "*", mention).rstrip("/.,")


def path_known(mention: str, outputs: list[str]) -> bool:
    """Held by the repository (data/sample/, data/upstream.yaml, ...), or an output, a path inside one, or a folder
    holding outputs (`metrics/costs/`)."""
    glob = pattern(mention)
    if list(ROOT.glob(glob)) or (ROOT / glob).exists():
        return True
    parts = glob.split("/")
    for out in outputs:
        if fnmatch.fnmatch(out, glob) or fnmatch.fnmatch(out, glob + "/*"):
            return True
        if any(fnmatch.fnmatch(out, "/".join(parts[:k])) for k in range(1, len(parts))):
            return True  # a file inside an output folder
    return False


def _fields(model) -> dict:
    return getattr(model, "model_fields", {})


def key_known(key: str) -> bool:
    """Whether `key` names a params.yaml key or section, or a key a method's own mapping may set."""
    parts = key.split(".")
    options = [[]]
    for part in parts:
        options = [o + [p] for o in options for p in PLACEHOLDERS.get(part, (part,))]
    for option in options:
        model = P.Params
        for part in option:
            fields = _fields(model)
            if part not in fields:
                break
            annotation = fields[part].annotation
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            model = args[0] if args and _fields(args[0]) else annotation
        else:
            return True
    return False


def mentions() -> tuple[list, list]:
    paths, keys = [], []
    for where, text in texts():
        paths += [(where, m.rstrip("/")) for m in PATH.findall(text)]
        keys += [(where, m) for m in KEY.findall(text)
                 if m.split(".")[0] in {*_fields(P.Params), *PLACEHOLDERS, *FORMER} and not m.endswith(FILE_SUFFIXES)]
        keys += [(where, m) for m in SET.findall(text)]
    return paths, keys


def test_every_path_the_docs_name_is_produced_or_held():
    outputs = produced()
    paths, _ = mentions()
    assert len(paths) > 30  # the check sees the docs
    stale = [f"{where}: {m}" for where, m in paths if not path_known(m, outputs)]
    assert stale == []


def test_every_params_key_the_docs_name_exists():
    _, keys = mentions()
    assert len(keys) > 30
    stale = [f"{where}: {k}" for where, k in keys if not key_known(k) and k not in MISTAKES]
    assert stale == []


@pytest.mark.parametrize("text, stale", [
    ("the base lands in `models/pretrained/` after download", "models/pretrained"),  # a folder of an old layout
    ("see data/predictions/lora.txt", "data/predictions/lora.txt"),  # a prediction file from before per-seed runs
    ("set `generate.num_beams=3`", "generate.num_beams"),  # a section that moved into the recipes
    ("set `train.seed: 1`", "train.seed"),  # a key that never existed
    ("dvc exp run -S train.epochs=3", "train.epochs"),  # a command with a key of the old layout
])
def test_the_checks_can_fail(text, stale):
    outputs = produced()
    found = [m.rstrip("/") for m in PATH.findall(text) if not path_known(m, outputs)]
    found += [k for k in KEY.findall(text) + SET.findall(text) if not key_known(k)]
    assert found == [stale]


@pytest.mark.parametrize("text", ["`models/lora-s110/adapter.safetensors`", "`metrics/scores/<run>.json`",
                                  "`data/prepared/li-liang/test`", "`-S +full.train.batch_size=12`",
                                  "`<recipe>.train.epochs`", "`lora.rank=8`", "`data/upstream.yaml`"])
def test_what_exists_passes(text):
    outputs = produced()
    assert [m for m in PATH.findall(text) if not path_known(m, outputs)] == []
    assert [k for k in KEY.findall(text) if not key_known(k)] == []
