"""The DVC contract, key by key: changing one params.yaml key reruns exactly the stages whose outputs it can change.

One table, CHANGES, holds a row for every leaf key of params.yaml: a new value and the stages it must rerun. Three
checks read it:
1. every leaf key has a row (a key added without one fails here);
2. what each stage reads (the keys whose change changes the config the stage computes from, found by changing
   each key in turn) is exactly what dvc.yaml declares for it, and exactly the table's row;
3. in a real workspace where the whole pipeline ran, `dvc status` after each change, made as `dvc exp run -S`
   makes it, reports exactly the row's stages (nothing run); edits of a local data or model directory too.
"""
from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from stages.lib import params as P
from test_dvc_deps import expand

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"train-lora", "train-full"}
DECODE = {"generate-base", "generate-lora", "generate-full"}
SCORE = {"score-base", "score-lora", "score-full"}
NOTHING: set[str] = set()
# A recipe's train and generate keys: a new value each, and keys to set with it where the new value needs them.
LOOP = {"epochs": 3, "batch_size": 4, "label_smoothing": 0.05, "warmup_steps": 7, "max_grad_norm": 0.5,
        "adam_epsilon": 1e-7, "gpt2_dropout": 0.05, "optimizer": "torch"}
DECODING = {"search": ("transformers", {}), "eos_ids": ([50256, 13], {"search": "transformers"}),
            "num_beams": (3, {}), "length_penalty": (0.7, {}), "no_repeat_ngram_size": (3, {"search": "transformers"}),
            "max_new_tokens": (32, {}), "early_stopping": ("never", {"search": "transformers"}),
            "banned_ids": ([13], {"search": "transformers"})}


def recipe_rows(name: str, layout: str, pad_token: bool, sampler: str, train: set[str], decode: set[str]) -> dict:
    rows = {f"{name}.layout": (layout, {*train, *decode}), f"{name}.pad_token": (pad_token, {*train, *decode})}
    rows |= {f"{name}.train.{k}": (v, train) for k, v in {**LOOP, "sampler": sampler}.items()}
    rows |= {f"{name}.generate.{k}": (v, decode, {f"{name}.generate.{c}": w for c, w in context.items()})
             for k, (v, context) in DECODING.items()}
    return rows


# key: (new value, the stages it reruns (foreach stages by name, every seed)[, other keys set before and after])
CHANGES = {
    "protocol": ("e2e", {"download-data", "preprocess", *SCORE, "report"}),
    "data.source": ("data/sample-copy", {"download-data"}),
    "model.source": ("base-model-copy", {"download-model"}),
    "preprocess.max_length": (100, {"preprocess"}),
    "train.seeds": ([110, 111], {"report"}),  # and the new seed's runs (test_dvc_status_reruns_exactly_the_row)
    "train.processes": (2, TRAIN),
    "lora.recipe": ("li_liang", {"train-lora", "generate-lora", "report"}),
    "lora.rank": (8, {"train-lora"}),
    "lora.alpha": (16, {"train-lora"}),
    "lora.dropout": (0.0, {"train-lora"}),
    "lora.targets": (["q", "k", "v", "o"], {"train-lora"}),
    "lora.lr": (0.001, {"train-lora"}),
    "lora.weight_decay": (0.0, {"train-lora"}),
    "lora.train": ({"epochs": 1}, {"train-lora"}),
    "lora.generate": ({"num_beams": 3}, {"generate-lora"}),
    "full.recipe": ("authors", {"train-full", "generate-full", "report"}),
    "full.lr": (0.0001, {"train-full"}),
    "full.weight_decay": (0.01, {"train-full"}),
    "full.train": ({"epochs": 1}, {"train-full"}),
    "full.generate": ({"num_beams": 3}, {"generate-full"}),
    # the authors' recipe: LoRA's runs, and the base's decoding; Li & Liang's: full fine-tuning's (the defaults)
    **recipe_rows("authors", "equals", True, "random", {"train-lora"}, {"generate-base", "generate-lora"}),
    **recipe_rows("li_liang", "paper", False, "authors", {"train-full"}, {"generate-full"}),
    "speed.precision": ("bf16", {*TRAIN, *DECODE}),
    "speed.compile": (True, {*TRAIN, *DECODE}),
    "speed.group_by_length": (True, TRAIN),
    "score.mode": ("perl", SCORE),
    "runtime.dataloader_workers": (1, NOTHING),
    "runtime.pin_memory": (False, NOTHING),
    "runtime.checkpoint_steps": (7, NOTHING),
    "runtime.generate_batch_size": (3, NOTHING),
}


def leaves(node, prefix="") -> list[str]:
    """Dotted keys of params.yaml's values: a list or an empty mapping is a value, a mapping is a section."""
    if not isinstance(node, dict) or (not node and prefix):
        return [prefix]
    return [k for key, value in node.items() for k in leaves(value, f"{prefix}.{key}" if prefix else key)]


def changed(params: dict, key: str, value) -> dict:
    params = copy.deepcopy(params)
    node = params
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return params


def row(key: str):
    value, stages, *context = CHANGES[key]
    return value, stages, (context[0] if context else {})


def group(stage: str) -> str:
    """`train-lora@110` -> `train-lora`: a foreach stage's row covers every seed."""
    return re.sub(r"@\d+$", "", stage)


def test_every_params_key_has_a_row():
    keys = leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert sorted(keys) == sorted(CHANGES), "add a row to CHANGES for each new key (and remove stale ones)"


# --- what each stage reads, derived from its config, against dvc.yaml --------------------------------------------

def stage_reads(stage: dict, params: dict) -> set[str]:
    """Keys whose change changes what the stage computes from: its module's `config`, or its command line."""
    module, method = re.search(r"python -m ([\w.]+)", stage["cmd"]).group(1), None
    if m := re.search(r"--method (\w+)", stage["cmd"]):
        method = m.group(1)
    config = getattr(importlib.import_module(module), "config", None)
    reads = set(re.findall(r"\$\{([\w.]+)\}", stage["cmd"]))  # keys DVC writes into the command itself
    for key in CHANGES:
        value, _, context = row(key)
        before, after = changed_all(params, context), changed_all(changed(params, key, value), context)
        if before == after:
            continue
        if config is not None:
            args = (method,) if method else ()
            if config(P.validate(before), *args) != config(P.validate(after), *args):
                reads.add(key)
    return reads


def changed_all(params: dict, context: dict) -> dict:
    for key, value in context.items():
        params = changed(params, key, value)
    return params


def declared(stage: dict, keys: list[str]) -> set[str]:
    """dvc.yaml's params entries of a stage as leaf keys (`speed` covers speed.precision, ...)."""
    entries = [e for e in stage.get("params", []) if isinstance(e, str)]
    return {k for k in keys for e in entries if k == e or k.startswith(e + ".")}


@pytest.fixture(scope="module")
def pipeline():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return params, expand(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_each_stage_declares_exactly_the_keys_it_reads(pipeline):
    params, stages = pipeline
    for name, stage in stages.items():
        reads = stage_reads(stage, params)
        assert declared(stage, list(CHANGES)) == reads, name
        assert reads == {k for k in CHANGES if group(name) in row(k)[1] or k == "train.seeds" and name == "report"}, \
            f"{name}: the table's rows disagree with what the stage reads"


def test_the_derivation_can_fail():
    """A stage that read a key it does not declare (generate reading lora.rank) is caught, naming the key."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stage = {"cmd": "python -m stages.generate --method lora", "params": []}
    from stages import generate
    original = generate.config
    try:
        generate.config = lambda p, method: {**original(p, method), "rank": p.lora.rank}
        assert "lora.rank" in stage_reads(stage, params) - declared(stage, list(CHANGES))
    finally:
        generate.config = original


# --- dvc status in a workspace where the whole pipeline ran -------------------------------------------------------

def override(key: str, value) -> list[str]:
    """`dvc exp run -S` arguments that set `key` to `value` (a mapping over an empty one: `+key.inner=v` each)."""
    def text(v):
        return json.dumps(v).replace('"', "").replace(" ", "") if isinstance(v, (list, bool)) else str(v)
    if isinstance(value, dict):
        return [f"+{key}.{k}={text(v)}" for k, v in value.items()]
    return [f"{key}={text(value)}"]


def dvc_status(ws: Path) -> set[str]:
    """The stages `dvc status` reports changed (DVC's own code, in this process: nothing runs)."""
    from dvc.repo import Repo
    with Repo(str(ws)) as repo:
        return {name.rsplit(":", 1)[-1] for name in repo.status()}  # `path/dvc.yaml:stage` outside the workspace


@pytest.fixture(scope="module")
def status_ws(tmp_path_factory, demo_workspace) -> Path:
    ws = tmp_path_factory.mktemp("status") / "demo"
    shutil.copytree(demo_workspace[0], ws, symlinks=True)
    shutil.copytree(ws / "data/sample", ws / "data/sample-copy")
    shutil.copytree(ws / "base-model", ws / "base-model-copy")
    assert dvc_status(ws) == set(), "the demo workspace must start clean"
    return ws


@pytest.mark.parametrize("key", list(CHANGES))
def test_dvc_status_reruns_exactly_the_row(status_ws, key):
    from dvc.utils.hydra import apply_overrides

    value, stages, context = row(key)
    params = status_ws / "params.yaml"
    original = params.read_bytes()
    try:
        apply_overrides(str(params), [o for k, v in {**context, key: value}.items() for o in override(k, v)])
        reported = dvc_status(status_ws)
    finally:
        params.write_bytes(original)
    if key == "train.seeds":  # the demo trains seed 110: a second seed adds its runs, the others stay cached
        runs = {f"{stage}-{method}@111" for stage in ("train", "generate", "score") for method in ("lora", "full")}
        assert reported == {"report", *runs}
    else:
        assert {group(s) for s in reported} == stages


@pytest.mark.parametrize("edit, stages", [
    ("data/sample/test.txt", {"download-data"}),  # the demo's local data.source
    ("base-model/config.json", {"download-model"}),  # the demo's local model.source
    ("stages/lib/scoring/__pycache__/ptb.cpython-311.pyc", NOTHING),  # byte code in a directory dependency
    ("data/sample/.#test.txt", NOTHING),  # an editor's lock file in a source directory
    ("base-model/config.json~", NOTHING),  # and its backup
])
def test_an_edit_in_a_local_source_is_seen_and_byte_code_is_not(status_ws, edit, stages):
    path = status_ws / edit
    original = path.read_bytes() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_bytes((original or b"") + b" ")
        assert dvc_status(status_ws) == stages
    finally:
        path.unlink()
        if original is not None:
            path.write_bytes(original)
