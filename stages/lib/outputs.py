"""Outputs that appear whole or not at all: a failed stage must leave no partial artifact for DVC to cache, and a
stage whose DVC died (stages/lib/lifeline.py) publishes none."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from stages.lib import lifeline
from stages.lib.cli import InputError


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (other threads may create files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_SIBLING = re.compile(r"(\d+)-(\d+)\.\w+")  # what follows `.<name>.` in a temporary sibling's name


def _prefix(path: Path) -> str:
    """`.<name>.<pid>-<start time>.`: a temporary sibling's name says which process made it."""
    me = lifeline.process(os.getpid())
    return f".{path.name}.{os.getpid()}-{me.start if me else 0}."


def _sweep(path: Path) -> None:
    """Remove `path`'s temporary siblings whose maker is gone: a SIGKILLed stage (or one that exited without its
    cleanup, lifeline's last resort) runs no `finally`; the next run of the stage clears what it left. Only where
    /proc tells a live maker from a dead one."""
    if not Path("/proc/self/stat").exists():
        return
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*"):
        m = _SIBLING.fullmatch(sibling.name[len(path.name) + 2:])
        if m is None:
            continue
        maker = lifeline.Process(int(m.group(1)), m.group(2), ())
        if int(m.group(2)) and not lifeline.alive(maker):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str = "output") -> None:
    """Fail in a second, not after an hour of training: `path`'s directory must exist (or be creatable) and
    accept a new file, since outputs are built in a sibling and renamed into place. Probed by creating one:
    permission bits say nothing to root, and nothing about read-only file systems."""
    parent = Path(path).absolute().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise InputError(f"{path}: cannot create the {what} here ({existing} is not a directory)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"{path}: cannot write the {what} here ({existing}: {e.strerror})") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the user's normal modes
    try:
        yield tmp
        lifeline.check()  # an orphaned stage (its DVC gone) publishes nothing
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """Yield an open temporary sibling file; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        lifeline.check()  # an orphaned stage (its DVC gone) publishes nothing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with this content: sha1(b"blob <len>\\0" + data), hex (how data/upstream.yaml pins)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """A file's sha256, read in 1 MiB chunks (model weights are 1.5 GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive(*paths: str | Path | None):
    """Hold every output path of this run (stages/lib/lifeline.py's flock): a second run of the same stage, while
    this one lives, stops with one line naming the path and this run's pid, before it writes anything."""
    with contextlib.ExitStack() as stack:
        for path in paths:
            if path is not None:
                stack.enter_context(lifeline.exclusive(path))
        yield
