"""Shared fixtures: the shipped GPT-2 tokenizer, the shipped E2E sample, params.yaml written per test."""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import yaml

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
    from stages.e2e import group_by_mr, read_e2e_csv

    groups = group_by_mr(read_e2e_csv(SAMPLE / name))[:n_mrs]
    return [(mr, ref) for mr, refs in groups for ref in refs]


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    """A small data/raw (download's output layout) cut from the shipped sample."""
    raw = tmp_path / "raw"
    write_csv(raw / "train.csv", sample_rows("trainset.csv", 6))
    write_csv(raw / "dev.csv", sample_rows("devset.csv", 2))
    write_csv(raw / "test.csv", sample_rows("testset_w_refs.csv", 3))
    return raw
