"""A stage never outlives the DVC that started it, and two runs never write one output at once (issue 19).

A SIGKILLed `dvc repro` runs no cleanup: its stage, reparented to init, trained on for minutes, a rerun trained
beside it in the same checkpoint folder, and the orphan finished last and overwrote the committed outputs.

- `watch()`: started once at a stage's start (stages/lib/cli.py `run` does it when a stage runs as a program). It
  finds the process that started the stage: the nearest ancestor whose command line is DVC's (`.../bin/dvc repro`,
  `dvc exp run`, `python -m dvc ...`), else the nearest ancestor that is not a `sh -c` wrapper. DVC runs `cmd`
  through `$SHELL -c`: bash execs the command, dash (Debian's /bin/sh) stays as a parent, which a killed DVC
  leaves running. A daemon thread then waits on every process from the stage's parent up to that one (a pidfd per
  process where Linux has pidfd_open, checked against the start time in /proc/<pid>/stat so that a reused pid is
  never mistaken for the original; else polling /proc every half second). When one of them dies the stage
  delivers SIGTERM to itself, so that its normal cleanup runs (atomic outputs removed, METEOR's JVM killed), and
  publishes nothing (outputs.py asks `check()` before each rename). torch.distributed workers (train.processes > 1)
  run `python -m stages.train` too: their chain holds the launcher and the same DVC, so they stop with either.
- `exit_on_signals()`: SIGTERM and SIGHUP raise `Stopped` (a SystemExit, status 128 + signal) in the main thread,
  so that `finally` blocks run; if the main thread is stuck in native code (a collective waiting on a dead rank)
  and has not exited `GRACE_S` seconds after the signal, the process exits at once (status 128 + signal).
- `exclusive(path, what)`: an flock on a lock file outside the workspace (a per-user runtime directory, keyed by
  the path's absolute form: nothing for DVC to see or .dvcignore to list); the kernel releases it when its holder
  dies, even by SIGKILL. A second run is refused in one InputError line naming the path and the first run's pid.

`LORA_E2E_LIFELINE=0` turns `watch()` off: for a stage started by hand that must outlive its shell (nohup ... &).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from stages.lib.cli import InputError

ENV = "LORA_E2E_LIFELINE"
LOCK_DIR_ENV = "LORA_E2E_LOCK_DIR"  # where exclusive() keeps its lock files (default: a per-user runtime dir)
GRACE_S = 5.0  # after SIGTERM/SIGHUP, how long the main thread gets to clean up before the process just exits
POLL_S = 0.5  # how often /proc is read where pidfds are missing (and, as a second check, where they are not)
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "busybox", "fish"}


@dataclass(frozen=True)
class Process:
    pid: int
    start: str  # /proc/<pid>/stat field 22 (clock ticks since boot): pid + start time name one process for good
    argv: tuple[str, ...]

    def __str__(self) -> str:
        """`python dvc repro (pid 123)`: the program's and script's base names, then the arguments, cut short."""
        words = [os.path.basename(a) if i < 2 else a for i, a in enumerate(self.argv)]
        text = " ".join(words)
        return f"{text[:60] + ('...' if len(text) > 60 else '') or '?'} (pid {self.pid})"


class Stopped(SystemExit):
    """SIGTERM or SIGHUP arrived (from the lifeline, DVC or a user): status 128 + signal, `reason` says which."""

    def __init__(self, signum: int, reason: str):
        super().__init__(128 + signum)
        self.signum, self.reason = signum, reason


_state = {"reason": None, "watched": None}
_lock = threading.Lock()


# --- processes ---------------------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) from /proc/<pid>/stat, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces and parentheses
    return fields[0], int(fields[1]), fields[19]


def process(pid: int) -> Process | None:
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return None
    try:
        argv = tuple(a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a)
    except OSError:
        argv = ()
    return Process(pid, st[2], argv)


def alive(p: Process) -> bool:
    """Whether `p` is still running: same pid AND same start time (a pid reused since is another process)."""
    st = _stat(p.pid)
    return st is not None and st[0] not in ("Z", "X") and st[2] == p.start


def ancestors(pid: int | None = None) -> list[Process]:
    """The parent of `pid` (default: this process), its parent, ... up to (not including) pid 0."""
    out: list[Process] = []
    st = _stat(os.getpid() if pid is None else pid)
    seen = set()
    while st is not None and st[1] > 0 and st[1] not in seen:
        seen.add(st[1])
        p = process(st[1])
        if p is None:
            break
        out.append(p)
        st = _stat(p.pid)
    return out


def is_dvc(argv: tuple[str, ...]) -> bool:
    """`dvc ...`, `python .../bin/dvc ...` or `python -m dvc ...` (also `dvc exp run`'s queue workers)."""
    head = [os.path.basename(a) for a in argv[:3]]
    return bool(head) and (head[0] == "dvc" or (len(head) > 1 and head[1] == "dvc")
                           or (len(head) > 2 and head[1] == "-m" and head[2] == "dvc"))


def _is_shell_wrapper(argv: tuple[str, ...]) -> bool:
    """`sh -c CMD` and the like: a shell that only runs our command, not the process that decided to run it."""
    return bool(argv) and os.path.basename(argv[0]).lstrip("-") in SHELLS and "-c" in argv[1:]


def starters(chain: list[Process] | None = None) -> list[Process]:
    """The processes whose death stops this one: from the parent up to the nearest DVC ancestor, or, without one,
    up to the nearest ancestor that is not a `sh -c` wrapper (the direct parent when that is not a shell)."""
    chain = ancestors() if chain is None else chain
    for i, p in enumerate(chain):
        if is_dvc(p.argv):
            return chain[:i + 1]
    for i, p in enumerate(chain):
        if not _is_shell_wrapper(p.argv):
            return chain[:i + 1]
    return chain[:1]


# --- watching ----------------------------------------------------------------------------------------------------

def _open_pidfds(procs: list[Process]) -> tuple[dict[int, Process], Process | None]:
    """A pidfd per process (opened, then its start time checked again: the pid may have been reused in between),
    or the first process already gone."""
    fds: dict[int, Process] = {}
    if not hasattr(os, "pidfd_open"):
        return fds, None
    for p in procs:
        try:
            fd = os.pidfd_open(p.pid)
        except ProcessLookupError:
            return fds, p
        except OSError:  # no pidfd support (old kernel, seccomp): /proc polling instead
            for fd in fds:
                os.close(fd)
            return {}, None
        fds[fd] = p
        if not alive(p):
            return fds, p
    return fds, None


def _wait_for_death(procs: list[Process], poll_s: float) -> Process:
    """Block until one of `procs` has exited; return it."""
    fds, gone = _open_pidfds(procs)
    try:
        if gone is not None:
            return gone
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll(int(poll_s * 1000)) if fds else ():
                return fds[fd]
            if not fds:
                time.sleep(poll_s)
            for p in procs:  # also where pidfds exist: cheap, and independent of them
                if not alive(p):
                    return p
    finally:
        for fd in fds:
            os.close(fd)


def _stop_self(reason: str, grace_s: float) -> None:
    with _lock:
        _state["reason"] = reason
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)  # normally the main thread exits cleanly within this
    _hard_exit(signal.SIGTERM, reason, grace_s)


def _hard_exit(signum: int, reason: str, grace_s: float) -> None:
    print(f"{_prog()}: stopped: {reason}; no clean exit within {grace_s:.0f} s, exiting now", file=sys.stderr,
          flush=True)
    os._exit(128 + signum)


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c", "-m") else "stage"


def enabled() -> bool:
    return os.environ.get(ENV, "1") not in ("0", "false", "no", "off") and Path("/proc/self/stat").exists()


def watch(grace_s: float = GRACE_S, poll_s: float = POLL_S) -> list[Process]:
    """Stop this process (SIGTERM to itself, then exit after `grace_s`) when a process in `starters()` dies.
    Once per process; returns the watched processes ([] when off: LORA_E2E_LIFELINE=0, or no /proc)."""
    with _lock:
        if _state["watched"] is not None:
            return _state["watched"]
        _state["watched"] = procs = starters() if enabled() else []
    if not procs:
        return procs

    def run() -> None:
        gone = _wait_for_death(procs, poll_s)
        _stop_self(f"{gone} that started this stage is gone", grace_s)

    threading.Thread(target=run, name="lifeline", daemon=True).start()
    return procs


def stopped() -> str | None:
    """Why the lifeline stopped this process (None if it did not)."""
    with _lock:
        return _state["reason"]


def check() -> None:
    """Raise Stopped if the lifeline fired, or if a watched process is gone right now (before the watcher thread
    has reacted): outputs.py calls this before publishing, so an orphan never renames an output into place."""
    reason = stopped()
    if reason is None:
        with _lock:
            procs = _state["watched"] or []
        gone = next((p for p in procs if not alive(p)), None)
        if gone is not None:
            reason = f"{gone} that started this stage is gone"
            with _lock:
                _state["reason"] = reason
    if reason is not None:
        raise Stopped(signal.SIGTERM, reason)


# --- signals -----------------------------------------------------------------------------------------------------

def _raise_stopped(signum, frame):
    name = signal.Signals(signum).name
    raise Stopped(signum, stopped() or f"{name} received")


def exit_on_signals(signals=(signal.SIGTERM, signal.SIGHUP), grace_s: float = GRACE_S) -> None:
    """SIGTERM/SIGHUP raise Stopped in the main thread (finally blocks run); a watchdog thread, woken by the
    signal itself (signal.set_wakeup_fd: written by the C-level handler even while the main thread is stuck in
    native code), exits the process `grace_s` seconds later if it is still running. Call from the main thread."""
    for sig in signals:
        signal.signal(sig, _raise_stopped)
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        old = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        os.close(read)
        os.close(write)
        return
    if old != -1:  # someone else's wakeup fd: leave theirs, and no watchdog
        signal.set_wakeup_fd(old)
        os.close(read)
        os.close(write)
        return
    wanted = {int(s) for s in signals}

    def watchdog() -> None:
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            hit = next((b for b in data if b in wanted), None)
            if hit is not None:
                time.sleep(grace_s)
                _hard_exit(hit, stopped() or f"{signal.Signals(hit).name} received", grace_s)

    threading.Thread(target=watchdog, name="lifeline-signals", daemon=True).start()


# --- one run per output ------------------------------------------------------------------------------------------

def lock_dir() -> Path:
    """A per-user directory for exclusive()'s lock files, outside any workspace: $LORA_E2E_LOCK_DIR, else
    $XDG_RUNTIME_DIR/lora-e2e/locks, else /tmp/lora-e2e-<uid>/locks (one fixed place, whatever TMPDIR says, so
    that every run of the user sees the same locks)."""
    if os.environ.get(LOCK_DIR_ENV):
        path = Path(os.environ[LOCK_DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR") and Path(os.environ["XDG_RUNTIME_DIR"]).is_dir():
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "lora-e2e" / "locks"
    else:
        path = Path("/tmp") / f"lora-e2e-{os.getuid()}" / "locks"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.parent.lstat()
    except OSError as e:
        raise InputError(f"{path}: cannot keep run locks here ({e.strerror}); set {LOCK_DIR_ENV}") from None
    shared = path.parent.parent == Path("/tmp")  # anyone may have made it first: it must be ours, not a link
    if shared and (not os.path.isdir(path.parent) or os.path.islink(path.parent) or st.st_uid != os.getuid()):
        raise InputError(f"{path.parent}: not a directory of this user's; set {LOCK_DIR_ENV} to one that is")
    return path


def lock_file(path: str | Path) -> Path:
    """The lock file of `path`: keyed by its absolute, symlink-resolved form, its name kept for the curious."""
    key = str(Path(path).resolve())
    return lock_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}-{Path(key).name[:40]}.lock"


_held: dict[Path, int] = {}  # lock file -> nesting depth, for exclusive() within one process


def _holder(fd: int) -> Process | None:
    """The process recorded in a lock file (pid and start time on its first line); None if unreadable."""
    for _ in range(20):  # the holder writes its line right after taking the lock: give it a moment
        try:
            pid, start = os.pread(fd, 200, 0).decode().split("\n", 1)[0].split()[:2]
            p = process(int(pid))
            return p if p is not None and p.start == start else Process(int(pid), start, ())
        except (OSError, ValueError):
            time.sleep(0.01)
    return None


@contextlib.contextmanager
def exclusive(path: str | Path, what: str = "output"):
    """Hold `path` for this run, or raise InputError `<path>: another run is writing this <what> (pid N: ...)`.

    The lock is an flock on a file in lock_dir() (the kernel drops it when the holder dies, SIGKILL included).
    Nested use in one process, and use by a descendant of the holder (the torch.distributed workers of a launcher
    that holds it), pass through. Take it before expensive work, around everything the run writes to `path`."""
    import fcntl

    lock = lock_file(path)
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if holder is not None and any((a.pid, a.start) == (holder.pid, holder.start) for a in ancestors()):
                yield  # our own run: a launcher's worker writing what its launcher holds
                return
            who = f"pid {holder.pid}: {' '.join(holder.argv)[:100]}" if holder and holder.argv else (
                f"pid {holder.pid}" if holder else "pid unknown")
            raise InputError(f"{path}: another run is writing this {what} ({who}); wait for it to finish or stop "
                             "it") from None
        try:
            same = os.stat(lock)
            mine = os.fstat(fd)
            if (same.st_ino, same.st_dev) == (mine.st_ino, mine.st_dev):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed this file after we opened it: take the new one
    me = process(os.getpid())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {me.start if me else 0}\n{Path(path).resolve()}\n".encode(), 0)
    _held[lock] = 1
    try:
        yield
    finally:
        del _held[lock]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still holding it: whoever opened this file before now retries on the new one
        os.close(fd)
