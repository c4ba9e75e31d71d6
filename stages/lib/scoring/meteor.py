"""METEOR 1.5 as pycocoevalcap runs it for the E2E scorer (one JVM, `-stdio -l en -norm`), with the paraphrase
table cut down to the input (stages/lib/scoring/paraphrase.py: same scores, the JVM starts in about a second).

The JVM never outlives us: it gets SIGKILL from the kernel when the thread that started it dies (Linux
`prctl(PR_SET_PDEATHSIG)`, set between fork and exec), so a scorer killed by SIGKILL or the OOM killer leaves no JVM
blocked on its paraphrase pipe; every exit Python sees (errors, SIGTERM via the CLI's handler) kills it in
`Meteor.close()`, which also cancels a paraphrase index build in progress (stages/lib/scoring/paraphrase.py).

Nothing on disk to leave behind: the filtered table reaches the JVM through an anonymous pipe that it opens as
`/dev/fd/N` (inherited descriptor N), not a named pipe in a temporary directory, which a SIGKILLed scorer (no cleanup
runs) would leave in /tmp; the kernel frees a pipe when the last process holding it dies. `-XX:-UsePerfData` keeps
the JVM from writing /tmp/hsperfdata_<user>/<pid>, which a killed JVM leaves too. Only where /dev/fd is missing
(Windows) does the table go through a temporary file, removed on every exit Python sees.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from stages.lib.cli import InputError
from stages.lib.scoring import paraphrase
from stages.lib.scoring.paraphrase import METEOR_JAR, PARAPHRASE_TABLE

JAVA_INSTALL_HINT = "install a Java runtime, e.g. `apt-get install default-jre-headless`"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class JavaError(InputError):
    """Java is missing, or METEOR's JVM failed or timed out: the machine's to fix (exit 2, as every bad input)."""


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaError(f"METEOR needs Java but `java` is not on PATH: {JAVA_INSTALL_HINT}")
    return java


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # looked up here, not in the forked child (no dlopen between fork and exec)


def _die_with_parent_hook():
    """A preexec_fn: the child gets SIGKILL when its parent (the forking thread) dies. If the parent is already gone
    by the time the child runs this (a kill between fork and prctl), the child kills itself."""
    if _PRCTL is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def _start_meteor(paraphrase_file: Path | str | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """METEOR 1.5 as pycocoevalcap runs it (`-stdio -l en -norm`), in an English number locale and UTF-8 I/O:
    under a decimal-comma locale the JVM prints scores like 0,4801 that cannot be parsed. `paraphrase_file`
    replaces the default table (`-a`). JIT flags: this short run spends more CPU in the C2 compiler than it saves
    (measured: 8.9 s -> 3.3 s CPU on the E2E test set); the client compiler and serial GC change no result (Java 17
    floating point is always strict); no perf-data file in /tmp. `pass_fds`: descriptors the JVM inherits (the
    table's pipe). The parent-death signal is tied to the calling thread: call this from a
    thread that outlives the run (the caller's, or METEOR's worker which waits for the JVM)."""
    cmd = [_java(), "-Xmx2G", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-XX:-UsePerfData",
           "-Duser.language=en", "-Duser.country=US", "-Dfile.encoding=UTF-8",
           "-jar", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"]
    if paraphrase_file is not None:
        cmd += ["-a", str(paraphrase_file)]
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    return subprocess.Popen(cmd, cwd=METEOR_JAR.parent, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_die_with_parent_hook(), pass_fds=pass_fds)


def _meteor_line(refs: list[str], hyp: str) -> str:
    # pycocoevalcap Meteor._stat: "|||" is removed from the hypothesis only, and double spaces halved once.
    hyp = hyp.replace("|||", "").replace("  ", " ")
    return " ||| ".join(("SCORE", " ||| ".join(refs), hyp)) + "\n"


class MeteorResult(NamedTuple):
    score: float
    segment_stats: list[str]  # METEOR's sufficient statistics per instance, as it printed them
    segment_scores: list[str]  # per-instance scores as printed after EVAL


def _write(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.flush()
    except (OSError, ValueError):
        pass  # the reader reports the JVM's failure


def _run_meteor(proc: subprocess.Popen, refs: list[list[str]], hyps: list[str], timeout: float) -> MeteorResult:
    """Corpus METEOR: one SCORE line per instance gives its statistics, one EVAL line over them all the score."""
    timer = threading.Timer(timeout, proc.kill)  # a JVM that hangs is killed: our reads then end at EOF
    timer.daemon = True
    timer.start()
    try:
        # Written from a second thread, so that a full stdout pipe cannot block the JVM while we are still writing.
        score_lines = "".join(_meteor_line(r, h) for r, h in zip(refs, hyps)).encode()
        with ThreadPoolExecutor(1, thread_name_prefix="meteor-stdin") as pool:
            writing = pool.submit(_write, proc.stdin, score_lines)
            stats = [proc.stdout.readline().decode().strip() for _ in hyps]
            writing.result()
        proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        proc.stdin.close()
        lines = proc.stdout.read().decode().split()
        proc.wait()
        # after one score per segment comes the corpus score
        return MeteorResult(float(lines[len(hyps)]), stats, lines[:len(hyps)])
    except (OSError, ValueError, IndexError):
        proc.kill()
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
        if not timer.is_alive():
            raise JavaError(f"METEOR (Java) did not finish within {timeout:.0f} s") from None
        raise JavaError(f"METEOR (Java) failed: {' | '.join(err) or 'no output'}") from None
    finally:
        timer.cancel()


class Meteor:
    """One METEOR 1.5 run, started before its input is known. With `filtered`, METEOR gets only the paraphrase-table
    entries that can match the input (identical scores; stages/lib/scoring/paraphrase.py): its table argument is
    /dev/fd/N, the read end of an anonymous pipe, so the JVM boots and loads WordNet while Python tokenizes and
    filters, then reads the filtered table from the pipe. Any failure in filtering falls back to a JVM with the full
    table (slow, same scores). Without /dev/fd (Windows) the filtered table goes through a temporary file and the
    JVM starts when the input is known. `close()` (any thread) kills the JVM and cancels the filtering."""

    def __init__(self, filtered: bool = True):
        _java()
        self.filtered = filtered and PARAPHRASE_TABLE.is_file()
        self.tmpdir = None
        self.proc = None
        self._pipe = None  # the write end of the table's pipe, until run() takes it
        self._lock = threading.Lock()  # close() may come from the caller's thread while run() is in METEOR's
        self._closed = False
        self._cancel = threading.Event()
        if not self.filtered:
            return
        if not _DEV_FD:
            self.tmpdir = tempfile.mkdtemp(prefix="meteor-")
            return
        read, write = os.pipe()  # both ends close-on-exec; the JVM inherits the read end alone, by pass_fds
        try:
            self.proc = _start_meteor(f"/dev/fd/{read}", pass_fds=(read,))
        except BaseException:
            os.close(write)
            self.close()
            raise
        finally:
            os.close(read)  # the JVM holds it now: once it dies, a write here fails (EPIPE) instead of blocking
        self._pipe = write

    def _take_pipe(self) -> int | None:
        with self._lock:
            fd, self._pipe = self._pipe, None
            return fd

    def run(self, tok_refs: list[list[str]], tok_hyps: list[str], timeout: float = 300.0) -> MeteorResult:
        try:
            if self.filtered:
                try:
                    # The exact strings METEOR will normalise: its stdio split of each SCORE line on |||.
                    segments = [part for r, h in zip(tok_refs, tok_hyps)
                                for part in _meteor_line(r, h)[:-1].split("|||")[1:]]
                    data, _ = paraphrase.filtered(PARAPHRASE_TABLE, paraphrase.vocabulary(segments),
                                                  cancelled=self._cancel.is_set)
                    pipe = self._take_pipe()
                    if pipe is not None:
                        _feed_pipe(pipe, data, self.proc, timeout)
                    elif self.tmpdir is not None:
                        table = Path(self.tmpdir, "paraphrase.gz")
                        table.write_bytes(data)
                        self._start(table)
                    else:
                        raise JavaError("METEOR run closed")
                except Exception as e:  # noqa: BLE001 - the full table still gives the right score, slowly
                    if self._closed:
                        raise JavaError("METEOR run closed") from None
                    print(f"warning: METEOR paraphrase filtering failed ({e!r}); loading the full table",
                          file=sys.stderr)
                    self._stop()
                    self.filtered = False
            if self.proc is None:
                self._start(None)
            return _run_meteor(self.proc, tok_refs, tok_hyps, timeout)
        finally:
            self.close()

    def _start(self, table: Path | None) -> None:
        with self._lock:
            if self._closed:
                raise JavaError("METEOR run closed")
            self.proc = _start_meteor(table)

    def _stop(self) -> None:
        pipe = self._take_pipe()
        if pipe is not None:
            os.close(pipe)
        with self._lock:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.kill()
                self.proc.wait()
                for name in ("stdin", "stdout", "stderr"):  # no ResourceWarnings for a JVM we gave up on
                    try:
                        getattr(self.proc, name).close()
                    except (AttributeError, OSError):
                        pass
                self.proc = None

    def close(self) -> None:
        """Kill the JVM if still running, cancel the filtering and remove any temporary table; idempotent, callable
        from any thread."""
        with self._lock:
            self._closed = True
        self._cancel.set()
        self._stop()
        with self._lock:
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None


_DEV_FD = os.name == "posix" and os.path.isdir("/dev/fd")  # a process's open descriptors as paths (Linux, macOS)


def _feed_pipe(fd: int, data: bytes, proc: subprocess.Popen, timeout: float) -> None:
    """Write `data` into the table's pipe and close it; blocks while the JVM is busy booting, but never past its
    death (EPIPE) nor `timeout` (the JVM is killed, then EPIPE)."""
    timer = threading.Timer(timeout, proc.kill)  # a JVM that stops reading: EPIPE, not a hang
    timer.daemon = True
    timer.start()
    try:
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(data)
    except BrokenPipeError:
        raise JavaError("METEOR exited before reading its paraphrase table") from None
    finally:
        timer.cancel()


def meteor(tok_refs: list[list[str]], tok_hyps: list[str], timeout: float = 300.0,
           filtered: bool = True) -> MeteorResult:
    """METEOR 1.5 of PTB-tokenized hypotheses against references, as pycocoevalcap computes it (see `Meteor`)."""
    return Meteor(filtered).run(tok_refs, tok_hyps, timeout)
