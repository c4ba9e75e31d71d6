"""Wall and CPU time of `python -m stages.score` on the E2E test set with each system output in ../shared (skips
without it).

The official scorer (e2e-metrics measure_scores.py, Perl mode) takes 14-24 s per system on the development machines.
The first run is done with an empty cache directory (XDG_CACHE_HOME pointed at a fresh temporary folder), so it
includes building the METEOR paraphrase index once; the runs after it reuse that index, as every later run on a
machine does. CPU is user+sys of the scorer and its JVM; the load average is printed because other processes on a
small machine change the wall time a lot.

Run: .venv/bin/python benchmarks/bench_score.py [--repeat N] [--root TREE]
(--root: a checkout of another version to time instead, e.g. from `git archive <commit> | tar -x -C DIR`.)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "e2e"


def run_once(tree: Path, refs: Path, pred: Path, cache: str) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "stages.score", "--refs", str(refs), "--predictions", str(pred)],
                         cwd=tree, capture_output=True, text=True, env={**os.environ, "XDG_CACHE_HOME": cache})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if run.returncode == 0:
        scores = json.loads(run.stdout)
        status = "ok " + " ".join(f"{k}={v:.4f}" for k, v in scores.items())
    else:
        status = f"FAILED: {run.stderr.strip()[-200:]}"
    return wall, cpu, status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="warm-cache runs per system output (default 2)")
    ap.add_argument("--root", type=Path, default=ROOT, help="source tree to run stages.score from")
    args = ap.parse_args(argv)
    refs = SHARED / "testset_w_refs.csv"
    outputs = sorted((SHARED / "system-outputs").glob("*.txt"))
    if not refs.is_file() or not outputs:
        print(f"skipped: {SHARED} with testset_w_refs.csv and system-outputs/ not found")
        return 0
    print(f"{os.cpu_count()} CPUs; tree {args.root}")
    with tempfile.TemporaryDirectory(prefix="bench-score-cache-") as cache:
        for i, pred in enumerate(outputs):
            kinds = (["first run, empty cache"] if i == 0 else []) + ["warm cache"] * args.repeat
            for kind in kinds:
                load = os.getloadavg()[0]
                wall, cpu, status = run_once(args.root, refs, pred, cache)
                print(f"{pred.name:16s} {kind:22s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  "
                      f"load {load:4.1f}->{os.getloadavg()[0]:4.1f}  {status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
