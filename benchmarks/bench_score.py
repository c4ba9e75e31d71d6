"""Wall time of `python -m stages.score` on the E2E test set with each system output in ../shared (skips without it).

The official scorer (e2e-metrics measure_scores.py, Perl mode) takes 14-24 s per system on the development machines.
Run: .venv/bin/python benchmarks/bench_score.py
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "e2e"


def main() -> int:
    refs = SHARED / "testset_w_refs.csv"
    outputs = sorted((SHARED / "system-outputs").glob("*.txt"))
    if not refs.is_file() or not outputs:
        print(f"skipped: {SHARED} with testset_w_refs.csv and system-outputs/ not found")
        return 0
    for pred in outputs:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "stages.score", "--refs", str(refs), "--predictions", str(pred)],
                             cwd=ROOT, capture_output=True, text=True)
        took = time.perf_counter() - start
        status = "ok" if run.returncode == 0 else f"FAILED: {run.stderr.strip()[-200:]}"
        print(f"{pred.name:20s} {took:6.2f} s  {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
