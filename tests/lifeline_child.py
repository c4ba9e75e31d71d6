"""A stand-in stage for tests/test_lifeline.py, run as a program through stages.lib.cli.run like every stage:
it opens its output atomically, says it is ready (pid in --ready), then works until stopped.

    python tests/lifeline_child.py OUT --ready FILE [--lock] [--workers N] [--stuck] [--done]

--lock: hold lifeline.exclusive(OUT) around the work; --workers N: start N copies of itself first and wait for
them (as torch's elastic launcher runs train.processes workers); --stuck: block SIGTERM in the main thread and wait
in native code (a collective on a dead rank); --done: finish at once and publish OUT.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.lib import cli, lifeline, outputs  # noqa: E402


def work(args) -> None:
    workers = [subprocess.Popen([sys.executable, __file__, f"{args.out}.worker{i}", "--ready",
                                 f"{args.ready}.worker{i}"]) for i in range(args.workers)]
    with outputs.atomic_file(args.out) as f:
        f.write("partial\n")
        if args.stuck:  # blocked before saying ready: a SIGTERM from then on can only meet the stuck main thread
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # another thread takes it
        Path(args.ready).write_text(f"{os.getpid()}\n")
        if args.done:
            return
        if args.stuck:
            ctypes.CDLL(None).sleep(60)
        while True:
            if any(w.poll() is not None for w in workers):
                raise cli.RunError("a worker died")
            time.sleep(0.02)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--lock", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--stuck", action="store_true")
    ap.add_argument("--done", action="store_true")
    args = ap.parse_args(argv)
    if args.lock:
        with lifeline.exclusive(args.out, "test output"):
            work(args)
    else:
        work(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("child", main))
