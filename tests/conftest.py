"""Shared fixtures: the shipped GPT-2 tokenizer, the shipped E2E sample, params.yaml written per test."""
from __future__ import annotations

import copy
import csv
import os
from pathlib import Path

import pytest
import yaml

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N workers, one thread each, not one per core each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "gpt2" / "tokenizer.json"
SAMPLE = ROOT / "data" / "sample"


def default_params() -> dict:
    with open(ROOT / "params.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def set_key(params: dict, key: str, value) -> dict:
    node = params
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return params


@pytest.fixture
def params_file(tmp_path, monkeypatch):
    """Write params.yaml (project defaults + overrides) into a fresh cwd; returns the writer."""
    monkeypatch.chdir(tmp_path)

    def write(**overrides):
        params = copy.deepcopy(default_params())
        for key, value in overrides.items():
            set_key(params, key.replace("__", "."), value)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return params

    write()
    return write


def write_csv(path: Path, rows, header=("mr", "ref")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def sample_rows(name: str, n_mrs: int) -> list[tuple[str, str]]:
    """The first n_mrs MRs (all their references) of a shipped sample split."""
    from stages.lib.e2e import group_by_mr, read_e2e_csv

    groups = group_by_mr(read_e2e_csv(SAMPLE / name))[:n_mrs]
    return [(mr, ref) for mr, refs in groups for ref in refs]


AUTHORS_TWIN = {"trainset.csv": "train.txt", "devset.csv": "valid.txt", "testset_w_refs.csv": "test.txt"}


def write_raw(raw: Path, n_mrs: dict[str, int]) -> Path:
    """download's output for both protocols, cut from the shipped sample: the first n MRs of each CSV split, and
    the same rows from the authors' text files beside them (which hold the CSVs' rows in the same order)."""
    outputs = {"trainset.csv": "train.csv", "devset.csv": "dev.csv", "testset_w_refs.csv": "test.csv"}
    for name, n in n_mrs.items():
        rows = sample_rows(name, n)
        write_csv(raw / outputs[name], rows)
        lines = (SAMPLE / AUTHORS_TWIN[name]).read_text(encoding="utf-8").splitlines(keepends=True)
        (raw / AUTHORS_TWIN[name]).write_text("".join(lines[:len(rows)]), encoding="utf-8")
    return raw


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    """A small data/raw (download's output layout, both protocols' files) cut from the shipped sample."""
    return write_raw(tmp_path / "raw", {"trainset.csv": 6, "devset.csv": 2, "testset_w_refs.csv": 3})


TINY_GPT2 = dict(vocab_size=50257, n_positions=128, n_embd=16, n_layer=1, n_head=2)


def make_workspace(ws: Path, overrides: dict, train_mrs: int = 3) -> Path:
    """A pipeline workspace after preprocess: data/raw (cut from the sample), models/base (a tiny random GPT-2
    with the real tokenizer), params.yaml (defaults + `overrides`, dotted keys) and data/prepared."""
    import json
    import os

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from stages import preprocess

    write_raw(ws / "data" / "raw", {"trainset.csv": train_mrs, "devset.csv": 1, "testset_w_refs.csv": 2})
    overrides = {"preprocess.max_length": TINY_GPT2["n_positions"], **overrides}
    torch.manual_seed(0)
    base = ws / "models" / "base"
    GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).save_pretrained(base)
    (base / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    (base / "identity.json").write_text(json.dumps({"name": "tiny", "revision": None, "model_sha256": "0" * 64}))
    params = default_params()
    for key, value in overrides.items():
        set_key(params, key, value)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        preprocess.main(["--raw", "data/raw", "--base", "models/base", "--out", "data/prepared"])
    finally:
        os.chdir(cwd)
    return ws


# --- the demo workspace, built once per test run -----------------------------------------------------------------

BIN = Path(__import__("sys").executable).parent
# The demo shrunk to seconds per stage: a 1-layer, 32-wide GPT-2 (the real 50,257-token vocabulary), a fraction of
# an epoch, short beams; two copy steps and no copy gate (one layer cannot copy: tests/test_tiny_base.py covers it).
TINY_DEMO = {
    "DEMO_BASE_ARGS": "--layers 1 --width 32 --heads 2 --epochs 0.2 --copy-steps 2 --min-copy-accuracy 0",
    "DEMO_OVERRIDES": " ".join(f"{r}.{k}" for r in ("authors", "li_liang") for k in (
        "train.epochs=0.1", "train.warmup_steps=0", "generate.num_beams=2", "generate.max_new_tokens=8")),
}


def run(cmd, cwd, check=True, **env):
    """A command as a user runs it, with the project's environment on the PATH; its stdout and stderr."""
    import os
    import subprocess

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **env}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc if not check else proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory) -> tuple[Path, str]:
    """scripts/demo.sh run once per test run (TINY_DEMO): a git + DVC workspace where the whole pipeline ran and was
    committed, and what the script printed. Read it only; a test that changes a workspace takes `demo_copy`."""
    from filelock import FileLock

    # xdist's workers share their base temp's parent: the first to get the lock builds, the others read its result.
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    ws, printed = root / "pipeline" / "demo", root / "pipeline" / "demo.out"
    with FileLock(str(root / "pipeline.lock")):
        if not printed.exists():
            out = run(["bash", str(ROOT / "scripts" / "demo.sh"), str(ws)], cwd=ROOT, **TINY_DEMO)
            printed.write_text(out, encoding="utf-8")
    return ws, printed.read_text(encoding="utf-8")


@pytest.fixture
def demo_copy(demo_workspace, tmp_path) -> Path:
    """A private copy of the demo workspace (git, DVC cache and all), for a test that runs or edits things."""
    import shutil

    copy = tmp_path / "demo"
    shutil.copytree(demo_workspace[0], copy, symlinks=True)
    return copy


# --- tiny GPT-2s for the beam searches' tests (test_beam.py, test_li_liang_beam.py) -------------------------------

def peaked_gpt2(vocab: int, init_std: float, boosts: dict[int, float]):
    """A tiny random GPT-2 in float64 (so cache vs no-cache rounding cannot flip a ranking), its next-token
    distributions peaked by init std `init_std`, each token in `boosts` made likely by raising its logit by about
    boosts[token]."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=128, initializer_range=init_std,
                     bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():                       # logits = ln_f(h) . wte, so ln_f's bias along wte[token] lifts it
        for token, by in boosts.items():
            w = m.transformer.wte.weight[token]
            m.transformer.ln_f.bias += by * w / w.dot(w)
    return m


def float32_copy(model):
    """The same model in fp32 (the authors' dtype, and Li & Liang's)."""
    from transformers import GPT2LMHeadModel

    m = GPT2LMHeadModel(model.config)
    m.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return m.eval()


def nan_logits_copy(model):
    """The same model with one NaN in ln_f's bias, so every logit of every step is NaN."""
    import math

    import torch
    from transformers import GPT2LMHeadModel

    broken = GPT2LMHeadModel(model.config).double().eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.transformer.ln_f.bias[0] = math.nan
    return broken
