"""Resumable training: a run killed mid-way and rerun ends exactly where an uninterrupted run ends."""
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
# The hook makes the 4th optimizer step of the first run hang, so that the test kills it with checkpoint-2 on disk.
HANG = ("import os, time\n"
        "if os.environ.get('HANG_AT_STEP'):\n"
        "    import torch\n"
        "    step, calls = torch.optim.AdamW.step, []\n"
        "    def slow(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == int(os.environ['HANG_AT_STEP']):\n"
        "            time.sleep(600)\n"
        "        return step(self, *a, **k)\n"
        "    torch.optim.AdamW.step = slow\n")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("resume"), {
        "train.epochs": 2, "train.warmup_steps": 0, "train.batch_size": 4, "lora.lr": 0.05,
        "train.checkpoint_steps": 2})
    (ws / "hook").mkdir()
    (ws / "hook" / "sitecustomize.py").write_text(HANG)
    return ws


def command(name: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--method", "lora", "--seed", "110", "--data", "data/prepared", "--base",
            "models/base", "--out", f"models/{name}", "--costs", f"costs-{name}.json", "--live", f"live-{name}",
            "--checkpoints", f"checkpoints/{name}"]


def env(**more) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), "hook"]), "OMP_NUM_THREADS": "1", **more}


def digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(ws):
    proc = subprocess.run(command("straight"), cwd=ws, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (ws / "checkpoints/straight").exists()  # a finished run removes its checkpoints
    return digests(ws / "models/straight")


def kill_after_checkpoint(ws: Path, name: str, at_step: int) -> Path:
    proc = subprocess.Popen(command(name), cwd=ws, env=env(HANG_AT_STEP=str(at_step)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    saved = ws / "checkpoints" / name / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not saved.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the 3rd step runs; the 4th hangs in the hook
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert saved.exists() and not (ws / "models" / name).exists()
    return ws / "checkpoints" / name


def test_killed_run_resumes_to_the_same_bytes(ws, uninterrupted):
    kill_after_checkpoint(ws, "killed", at_step=4)
    proc = subprocess.run(command("killed"), cwd=ws, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoints/killed/checkpoint-2" in proc.stderr
    assert digests(ws / "models/killed") == uninterrupted  # adapter, train_info and loss history, bit for bit
    assert not (ws / "checkpoints/killed").exists()


def test_a_checkpoint_from_other_params_is_discarded_not_resumed(ws, uninterrupted):
    kill_after_checkpoint(ws, "changed", at_step=4)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["lora"]["lr"] = 0.01
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        proc = subprocess.run(command("changed"), cwd=ws, env=env(), capture_output=True, text=True, timeout=600)
    finally:
        params["lora"]["lr"] = 0.05
        (ws / "params.yaml").write_text(yaml.safe_dump(params))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "discarding checkpoints in checkpoints/changed: written by a run with other params" in proc.stderr
    assert "resuming" not in proc.stderr
    info = json.loads((ws / "models/changed/train_info.json").read_text())
    assert info["steps"] == json.loads((ws / "models/straight/train_info.json").read_text())["steps"]
    assert digests(ws / "models/changed") != uninterrupted  # another lr: trained from scratch, differently
