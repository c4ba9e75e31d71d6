"""train.processes: several worker processes from one param, run for real on CPU (gloo), as on GPUs (NCCL)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from conftest import make_workspace

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "stages.train", "--method", "lora", "--seed", "110", "--data", "data/prepared", "--base", "models/base",
         "--out", "models/lora", "--costs", "costs.json", "--live", "live"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("procs"), {
        "authors.train.epochs": 2, "authors.train.warmup_steps": 0, "authors.train.batch_size": 4, "lora.lr": 0.05,
        "train.processes": 2, "authors.generate.num_beams": 2, "authors.generate.max_new_tokens": 6}, train_mrs=4)


def run(ws, args, env=None, timeout=900):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), (env or {}).get("PYTHONPATH")])),
           **{k: v for k, v in (env or {}).items() if k != "PYTHONPATH"}}
    return subprocess.run([sys.executable, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(ws):
    proc = run(ws, TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws, proc


def test_two_processes_both_train_on_their_shard(trained):
    ws, _ = trained
    n = len(datasets.load_from_disk(str(ws / "data/prepared/paper/train")))
    info = json.loads((ws / "models/lora/train_info.json").read_text())
    # Each step, each of the 2 ranks takes a batch of 4: the data is split between them, not repeated.
    assert info["steps"] == 2 * math.ceil(n / (2 * 4))


def test_only_rank_zero_writes(trained):
    ws, proc = trained
    assert sorted(p.name for p in (ws / "models/lora").iterdir()) == [
        "adapter.safetensors", "log_history.json", "train_info.json"]
    assert proc.stderr.count("trainable parameters") == 1  # one final report, from rank 0
    assert not [p for p in (ws / "models").iterdir() if p.name.startswith(".")]  # no second, temporary copy


def test_loss_history_is_finite_and_decreasing(trained):
    ws, _ = trained
    losses = [h["loss"] for h in json.loads((ws / "models/lora/log_history.json").read_text()) if "loss" in h]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_generate_and_score_run_on_its_adapter(trained):
    ws, _ = trained
    gen = run(ws, ["-m", "stages.generate", "--method", "lora", "--data", "data/prepared", "--base", "models/base",
                   "--model", "models/lora", "--out", "pred/lora.txt", "--costs", "gen-costs.json"])
    assert gen.returncode == 0, gen.stderr[-3000:]
    score = run(ws, ["-m", "stages.score", "--refs", "data/raw/test.csv", "--predictions", "pred/lora.txt",
                     "--output", "scores.json"])
    assert score.returncode == 0, score.stderr[-3000:]
    scores = json.loads((ws / "scores.json").read_text())
    assert all(math.isfinite(scores[k]) for k in ("bleu", "nist", "meteor", "rouge_l", "cider"))


def test_a_crash_on_rank_one_fails_the_stage_within_seconds_naming_it(ws, tmp_path):
    """rank 1 raises at its second optimizer step but exits last (2 s of clean-up); rank 0 fails 0.5 s after it and
    exits first. The stage must not hang in an all-reduce, and must name rank 1, whose error came first (the launcher
    alone names the first exit it saw: rank 0)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os, time\n"
        "if 'RANK' in os.environ:\n"
        "    from stages.lib.optim import AuthorsAdamW\n"
        "    step, calls = AuthorsAdamW.step, []\n"
        "    def failing(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 2 and os.environ['RANK'] == '1':\n"
        "            atexit.register(time.sleep, 2)\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        if len(calls) == 2:\n"
        "            time.sleep(0.5)\n"
        "            raise RuntimeError('later failure on rank 0')\n"
        "        return step(self, *a, **k)\n"
        "    AuthorsAdamW.step = failing\n")
    start = time.monotonic()
    command = [*TRAIN[:TRAIN.index("--out") + 1], "models/crashed", *TRAIN[TRAIN.index("--out") + 2:]]
    proc = run(ws, command, env={"PYTHONPATH": str(hook)}, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "injected failure on rank 1" in proc.stderr
    assert "train: failed: rank 1 of 2 failed first" in proc.stderr
    assert not (ws / "models/crashed").exists()
    assert elapsed < 120  # seconds of start-up and a step, not a hang until a collective times out (30 min)
