"""Wall and CPU time of `python -m stages.score` in both modes (Perl and -p Python MT-Eval) on the E2E test set with
each system output in ../shared (skips without it), side by side with the official scorer when `--official RUNNER`
is given (RUNNER takes measure_scores.py's arguments; ../shared/tools/official-e2e-scorer.sh builds one). The runs of
one system output are interleaved (official, ours, official -p, ours -p), so load changes hit all of them alike; the
printed values let the reader check that each pair agrees.

The first run is done with an empty cache directory (XDG_CACHE_HOME pointed at a fresh temporary folder), so it
includes building the METEOR paraphrase index once; the runs after it reuse that index, as every later run on a
machine does. CPU is user+sys of the scorer and its JVM; the load average is printed because other processes on a
small machine change the wall time a lot.

Run: .venv/bin/python benchmarks/bench_score.py [--repeat N] [--root TREE] [--official RUNNER]
(--root: a checkout of another version to time instead, e.g. from `git archive <commit> | tar -x -C DIR`.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "e2e"


def timed(cmd: list[str], cwd: Path, cache: str) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "XDG_CACHE_HOME": cache})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), run


def ours(tree: Path, refs: Path, pred: Path, cache: str, mode: str) -> tuple[float, float, str]:
    wall, cpu, run = timed([sys.executable, "-m", "stages.score", "--mode", mode, "--refs", str(refs),
                            "--predictions", str(pred)], tree, cache)
    if run.returncode:
        return wall, cpu, f"FAILED: {run.stderr.strip()[-200:]}"
    scores = json.loads(run.stdout)
    return wall, cpu, " ".join(f"{k}={scores[k]:.4f}" for k in ("bleu", "nist", "meteor", "rouge_l", "cider"))


def official(runner: str, refs: Path, pred: Path, cache: str, mode: str) -> tuple[float, float, str]:
    with tempfile.TemporaryDirectory(prefix="bench-official-") as cwd:
        wall, cpu, run = timed([runner, str(refs), str(pred)] + (["-p"] if mode == "python" else []), Path(cwd),
                               cache)
    if run.returncode:
        return wall, cpu, f"FAILED: {run.stderr.strip()[-200:]}"
    found = dict(re.findall(r"^(BLEU|NIST|METEOR|ROUGE_L|CIDEr): ([0-9.]+)$", run.stdout, re.M))
    return wall, cpu, " ".join(f"{k.lower()}={found[k]}" for k in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="warm-cache runs per system output and mode (default 2)")
    ap.add_argument("--root", type=Path, default=ROOT, help="source tree to run stages.score from")
    ap.add_argument("--official", help="runner of the official scorer (measure_scores.py's arguments)")
    ap.add_argument("--systems", nargs="*", help="system output file names (default: all)")
    args = ap.parse_args(argv)
    refs = SHARED / "testset_w_refs.csv"
    outputs = sorted((SHARED / "system-outputs").glob("*.txt"))
    if args.systems:
        outputs = [o for o in outputs if o.name in args.systems]
    if not refs.is_file() or not outputs:
        print(f"skipped: {SHARED} with testset_w_refs.csv and system-outputs/ not found")
        return 0
    print(f"{os.cpu_count()} CPUs; tree {args.root}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-score-cache-") as cache:
        for i, pred in enumerate(outputs):
            if i == 0:
                wall, cpu, status = ours(args.root, refs, pred, cache, "perl")
                print(f"{pred.name:16s} ours perl, first run (empty cache) wall {wall:6.2f} s  cpu {cpu:6.2f} s  "
                      f"{status}", flush=True)
            for _ in range(args.repeat):
                for mode in ("perl", "python"):
                    runs = [("official", lambda: official(args.official, refs, pred, cache, mode))] \
                        if args.official else []
                    runs.append(("ours", lambda: ours(args.root, refs, pred, cache, mode)))
                    for who, fn in runs:
                        load = os.getloadavg()[0]
                        wall, cpu, status = fn()
                        walls.setdefault(f"{who} {mode}", []).append(wall)
                        print(f"{pred.name:16s} {who:8s} {mode:6s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  "
                              f"load {load:4.1f}  {status}", flush=True)
    for key, values in sorted(walls.items()):
        print(f"{key:16s} wall median {statistics.median(values):6.2f} s  (min {min(values):.2f}, n {len(values)})")
    for mode in ("perl", "python"):
        if f"official {mode}" in walls:
            ratio = statistics.median(walls[f"ours {mode}"]) / statistics.median(walls[f"official {mode}"])
            print(f"ours / official ({mode}): {ratio:.2f} of the wall time (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
