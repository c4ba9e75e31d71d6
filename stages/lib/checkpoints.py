"""Resumable training: the Trainer's checkpoints, kept only for the run that wrote them.

A rerun of the train stage with the same params, data, base model, code and libraries resumes from the last
checkpoint (weights, optimizer, scheduler, RNG state, data order: the Trainer's own checkpoint format). A
checkpoint written under anything else is discarded, saying so: resuming it would mix two runs in one result.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers

from stages.lib.outputs import sha256_file

FINGERPRINT = "fingerprint.json"


def fingerprint(cfg: dict, method: str, data_dirs: list[Path], base_identity: str, code: dict[str, Path]) -> dict:
    """Everything that decides the numbers a run produces, hashed; `code`: every project file the stage runs
    (stages/lib/code.py), by name."""
    files = {str(p): sha256_file(p) for d in data_dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}
    files |= {name: sha256_file(path) for name, path in code.items()}
    return {"method": method, "config": cfg, "base": base_identity, "files": files,
            "torch": torch.__version__, "transformers": transformers.__version__}


def latest(directory: Path) -> Path | None:
    """The newest complete Trainer checkpoint (`checkpoint-<step>` holding trainer_state.json), if any."""
    done = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def prepare(directory: Path, fp: dict) -> Path | None:
    """Make `directory` this run's checkpoint home; return the checkpoint to resume from, or None."""
    stamp = directory / FINGERPRINT
    if directory.exists():
        try:
            same = json.loads(stamp.read_text()) == json.loads(json.dumps(fp))
        except (OSError, ValueError):
            same = False
        resume = latest(directory) if same else None
        if resume is not None:
            print(f"train: resuming from {resume}", file=sys.stderr)
            return resume
        if any(directory.iterdir()):
            why = "written by a run with other params, data, code or libraries" if not same else "incomplete"
            print(f"train: discarding checkpoints in {directory}: {why}", file=sys.stderr)
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    stamp.write_text(json.dumps(fp, indent=2, sort_keys=True) + "\n")
    return None


def finish(directory: Path) -> None:
    """A finished run's checkpoints are no longer needed: its outputs are."""
    shutil.rmtree(directory, ignore_errors=True)
