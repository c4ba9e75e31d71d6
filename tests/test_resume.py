"""Resumable training: a run killed mid-way and rerun ends exactly where an uninterrupted run ends, every file the
train stage writes for DVC included (the weights, the loss history and DVCLive's curves; only the costs file,
timings by design, may differ)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_workspace

ROOT = Path(__file__).resolve().parents[1]
# The hook makes optimizer step HANG_AT_STEP of the run (the authors' AdamW, the recipe's) hang, after saying so
# in the file HANG_MARK: the test then kills the run, with the checkpoints written before that step on disk. No
# sleeps in the test: it waits for files.
HANG = ("import os, time\n"
        "if os.environ.get('HANG_AT_STEP'):\n"
        "    from stages.lib.optim import AuthorsAdamW\n"
        "    step, calls = AuthorsAdamW.step, []\n"
        "    def slow(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == int(os.environ['HANG_AT_STEP']):\n"
        "            open(os.environ['HANG_MARK'], 'w').close()\n"
        "            time.sleep(600)\n"
        "        return step(self, *a, **k)\n"
        "    AuthorsAdamW.step = slow\n")
# 23 examples, batch 1, 3 epochs: 69 steps, a log every ceil(0.02 * 69) = 2 steps. A checkpoint asked for every 3
# steps is written at the next log step (4, 8, ...), never between two logs, where a resume would log another loss.
SETTINGS = {"authors.train.epochs": 3, "authors.train.warmup_steps": 0, "authors.train.batch_size": 1,
            "lora.lr": 0.05, "runtime.checkpoint_steps": 3}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("resume"), SETTINGS)
    (ws / "hook").mkdir()
    (ws / "hook" / "sitecustomize.py").write_text(HANG)
    return ws


def command(name: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--method", "lora", "--seed", "110", "--data", "data/prepared",
            "--base", "models/base", "--out", f"models/{name}", "--costs", f"costs-{name}.json", "--live",
            f"live/{name}", "--checkpoints", f"checkpoints/{name}"]


def env(**more) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), "hook"]), "OMP_NUM_THREADS": "1", **more}


def tracked(ws: Path, name: str) -> dict:
    """sha256 of every file the stage writes for DVC but its costs: models/<name>/, DVCLive's directory."""
    files = [*sorted((ws / "models" / name).rglob("*")), *sorted((ws / "live" / name).rglob("*"))]
    return {str(p.relative_to(ws)).replace(name, "RUN"): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(ws):
    proc = subprocess.run(command("straight"), cwd=ws, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (ws / "checkpoints/straight").exists()  # a finished run removes its checkpoints
    log = json.loads((ws / "models/straight/log_history.json").read_text())
    assert [h["step"] for h in log if "loss" in h][:3] == [1, 2, 4]  # a log every 2 steps (and the first step)
    return tracked(ws, "straight")


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.02)


def kill_at(ws: Path, name: str, step: int) -> Path:
    """Start a run, SIGKILL it while optimizer step `step` hangs; return its checkpoint folder."""
    mark = ws / f"hanging-{name}"
    proc = subprocess.Popen(command(name), cwd=ws, env=env(HANG_AT_STEP=str(step), HANG_MARK=str(mark)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(mark, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (ws / "models" / name).exists()
    return ws / "checkpoints" / name


def rerun_with(ws: Path, name: str, section: str, key: str, value) -> subprocess.CompletedProcess:
    """Run `name` again with params.yaml's `section.key` set to `value` for that run only."""
    path = ws / "params.yaml"
    original = path.read_bytes()
    params = yaml.safe_load(original)
    params[section][key] = value
    path.write_text(yaml.safe_dump(params))
    try:
        return subprocess.run(command(name), cwd=ws, env=env(), capture_output=True, text=True, timeout=600)
    finally:
        path.write_bytes(original)


def test_killed_run_resumes_to_the_same_bytes(ws, uninterrupted):
    """Killed at step 7 (checkpoint-4 on disk, steps 5 and 6 already logged to DVCLive) and rerun with another
    runtime key (a loader worker: it changes no number, so it is not in the fingerprint): it resumes, and every
    file ends as an uninterrupted run's."""
    checkpoints = kill_at(ws, "killed", step=7)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4"]
    proc = rerun_with(ws, "killed", "runtime", "dataloader_workers", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoints/killed/checkpoint-4" in proc.stderr
    assert tracked(ws, "killed") == uninterrupted  # adapter, train_info, loss history, DVCLive: bit for bit
    assert not (ws / "checkpoints/killed").exists()


def test_a_checkpoint_from_other_params_is_discarded_not_resumed(ws, uninterrupted):
    kill_at(ws, "changed", step=7)
    proc = rerun_with(ws, "changed", "lora", "lr", 0.01)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "discarding checkpoints in checkpoints/changed: written by a run with other params" in proc.stderr
    assert "resuming" not in proc.stderr
    info = json.loads((ws / "models/changed/train_info.json").read_text())
    assert info["steps"] == json.loads((ws / "models/straight/train_info.json").read_text())["steps"]
    assert tracked(ws, "changed") != uninterrupted  # another lr: trained from scratch, differently
