"""METEOR 1.5's paraphrase table cut down to the entries that can match a given input, so that its JVM starts in about
a second instead of spending ~10 s loading all 5.3 M entries of `paraphrase-en.gz`; scores are unchanged.
Used by stages.lib.scoring.meteor.Meteor; `python -m stages.lib.scoring` builds the index ahead of the first use.

Why that is exact (METEOR 1.5 source, `edu.cmu.meteor.aligner`): `ParaphraseTransducer` reads the table as three
lines per entry (a probability it reads and discards, a phrase, its paraphrase), splits each phrase with
`StringTokenizer` and maps words to ids only for equality tests. `ParaphraseMatcher` finds an entry's phrase in one
line of a hypothesis/reference pair and its paraphrase in the other, word for word, where the lines are METEOR's
`-norm` normalisation (`Normalizer.normalizeLine(line, en, keepPunctuation=true)`, then `toLowerCase()`) split by
`StringTokenizer`; a word the table lacks gets id -1 and matches nothing. An entry therefore yields a match only if
every word of both its phrases is a word of the normalised input, and matches are collected in table order. Keeping
exactly those entries, in their original order, gives the same matches in the same order; keeping more is harmless.

So `vocabulary()` computes, in Python, a superset of the words the Normalizer can produce from the input (tests check
it against the Normalizer class of the jar itself), and the table is filtered against it through a word-id index
built once per table into a cache directory
(`$XDG_CACHE_HOME/lora-e2e` or `~/.cache/lora-e2e`, keyed by the table's path, size and mtime; built in a temporary
directory and renamed into place, so a failed or concurrent build never leaves a partial index; a build is
cancellable: it polls `cancelled()` at least every half second or so and raises `Cancelled`). Table words with
non-ASCII characters (or longer than MAX_SUBSTRING) are treated as always present (a superset), so that Java/Python
case-mapping differences cannot drop an entry. The probability lines are not kept (METEOR ignores them).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocoevalcap

try:
    import fcntl
except ImportError:  # not on Windows: concurrent builds are then merely wasted work, still atomic
    fcntl = None

# METEOR 1.5 as pycocoevalcap ships it, and its default English paraphrase table (Constants: data/paraphrase-en.gz next
# to the jar).
METEOR_JAR = Path(pycocoevalcap.__path__[0]) / "meteor" / "meteor-1.5.jar"
PARAPHRASE_TABLE = METEOR_JAR.parent / "data" / "paraphrase-en.gz"
INDEX_VERSION = 1
MAX_SUBSTRING = 48  # longest substring of a non-alphanumeric token that vocabulary() lists
_TOKEN_SPLIT = re.compile(r"[ \t\n\r\f]+")  # java.util.StringTokenizer's default delimiters


class TableError(RuntimeError):
    """The paraphrase table cannot be indexed (missing, malformed) or the normaliser failed."""


class Cancelled(Exception):
    """The caller gave up on the build or the filtering (`cancelled()` said so); nothing is left behind."""


def _never() -> bool:
    return False


def _check(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled("paraphrase table work cancelled")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora-e2e"


def _index_dir(table: Path, root: Path) -> Path:
    st = table.stat()
    key = f"{INDEX_VERSION}|{table.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return root / "meteor-paraphrase" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _counts(lines: list[bytes]) -> np.ndarray:
    """Number of StringTokenizer tokens of each line."""
    arr = np.frombuffer(b"\n".join(lines), dtype=np.uint8)
    ws = (arr == 32) | (arr == 9) | (arr == 10) | (arr == 13) | (arr == 12)
    starts = ~ws
    starts[1:] &= ws[:-1]
    line_of = np.cumsum(arr == 10)
    return np.bincount(line_of[starts], minlength=len(lines))


def build_index(table: Path, dest: Path, chunk_bytes: int = 1 << 25, cancelled: Callable[[], bool] = _never) -> None:
    """Word-id index of a METEOR paraphrase table: `words.txt` (one word per line, id = line number) and, per side
    (ref = the phrase, par = its paraphrase), the concatenated word ids and per-entry word counts. Streams the table
    in chunks so that memory stays well under a gigabyte. Polls `cancelled()` between steps of each chunk (each well
    under a second on the 5.3 M-entry table) and raises `Cancelled`; nothing is on disk until the last step."""
    word_id: dict[bytes, int] = {}
    parts: dict[str, list] = {"ref_ids": [], "par_ids": [], "ref_counts": [], "par_counts": []}
    rest: list[bytes] = []
    tail = b""
    with gzip.open(table, "rb") as f:
        while True:
            _check(cancelled)
            block = f.read(chunk_bytes)
            _check(cancelled)
            data = tail + block
            if not block:
                if data:
                    raise TableError(f"{table}: last line has no line end")
            # Java's readLine also ends lines at \r; \x0b splits Python words but not Java's: refuse, don't guess.
            if b"\r" in data or b"\x0b" in data:
                raise TableError(f"{table}: carriage returns or vertical tabs, not supported by the index")
            cut = data.rfind(b"\n") + 1
            lines, tail = rest + data[:cut].split(b"\n")[:-1], data[cut:]
            whole = len(lines) - len(lines) % 3
            lines, rest = lines[:whole], lines[whole:]
            for side, phrases in (("ref", lines[1::3]), ("par", lines[2::3])):
                _check(cancelled)
                tokens = b" ".join(phrases).split()
                counts = _counts(phrases)
                if counts.sum() != len(tokens):
                    raise TableError("paraphrase table tokenisation mismatch")
                _check(cancelled)
                for w in set(tokens).difference(word_id):
                    word_id[w] = len(word_id)
                _check(cancelled)
                parts[f"{side}_ids"].append(np.fromiter(map(word_id.__getitem__, tokens), dtype=np.uint32,
                                                        count=len(tokens)))
                parts[f"{side}_counts"].append(counts.astype(np.uint16))
            if not block:
                break
    if rest:
        raise TableError(f"{table}: {len(rest)} trailing line(s), not three per entry")
    dtype = np.uint16 if len(word_id) < 2**16 else np.uint32
    _check(cancelled)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        (tmp / "words.txt").write_bytes(b"".join(w + b"\n" for w in word_id))  # insertion order = id
        for name, arrays in parts.items():
            arr = np.concatenate(arrays) if arrays else np.zeros(0, np.uint16)
            np.save(tmp / f"{name}.npy", arr.astype(dtype) if name.endswith("_ids") else arr)
        entries = int(sum(len(c) for c in parts["ref_counts"]))
        (tmp / "meta.json").write_text(json.dumps({"version": INDEX_VERSION, "table": str(table.resolve()),
                                                   "entries": entries, "words": len(word_id)}))
        try:
            os.rename(tmp, dest)  # atomic; fails if a concurrent build got there first, whose index is as good
        except OSError:
            if not (dest / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_BUILD_LOCK = threading.Lock()


def _lock(lock, cancelled: Callable[[], bool]) -> None:
    """flock(LOCK_EX) on `lock`, waiting for another builder without ever blocking past a cancellation."""
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes, or the process dies
            return
        except BlockingIOError:
            _check(cancelled)
            time.sleep(0.1)


def ensure_index(table: Path, root: Path | None = None, cancelled: Callable[[], bool] = _never) -> Path:
    """The index of `table`, built first if the cache lacks it (one builder at a time, across processes too)."""
    dest = _index_dir(table, root or cache_root())
    if (dest / "meta.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK, open(dest.parent / ".lock", "a+b") as lock:
        if fcntl is not None:
            _lock(lock, cancelled)
            # We hold the lock, so no build is running: a `.build-*` left here is from a process killed while it
            # wrote its index (a SIGKILL runs no cleanup), and goes.
            for stale in dest.parent.glob(".build-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if not (dest / "meta.json").is_file():
            build_index(table, dest, cancelled=cancelled)
    return dest


def _lines_of(words: np.ndarray, ids: np.ndarray, counts: np.ndarray, keep: np.ndarray) -> list[str]:
    """The kept entries' phrases, words joined by single spaces (equivalent under StringTokenizer)."""
    kept_counts = counts[keep]
    toks = words[ids[np.repeat(keep, counts)]]
    seps = np.full(len(toks), " ", dtype=object)
    ends = np.cumsum(kept_counts)
    seps[ends[kept_counts > 0] - 1] = "\n"
    interleaved = np.empty(2 * len(toks), dtype=object)
    interleaved[0::2], interleaved[1::2] = toks, seps
    # Entries with no words on a side (none in METEOR's tables) get an empty line.
    text = "".join(interleaved.tolist()).split("\n")[:-1] if len(toks) else []
    if len(text) != int((kept_counts > 0).sum()):
        raise TableError("paraphrase filter: phrase count mismatch")
    if len(text) == len(kept_counts):
        return text
    it = iter(text)
    return [next(it) if c else "" for c in kept_counts.tolist()]


def filtered(table: Path, vocabulary: set[str], root: Path | None = None,
             cancelled: Callable[[], bool] = _never) -> tuple[bytes, int]:
    """The entries of `table` whose words all occur in `vocabulary`, in table order, as a gzipped table, and their
    number. The probability line, which METEOR reads and discards, is written as 1. `cancelled` as for build_index."""
    index = ensure_index(table, root, cancelled)
    _check(cancelled)
    raw = (index / "words.txt").read_bytes().split(b"\n")[:-1]
    words = np.array([w.decode("utf-8", "replace") for w in raw], dtype=object)
    # Non-ASCII table words count as present: keeps a superset whatever Java's and Python's case mappings do; so do
    # words longer than the substrings vocabulary() enumerates.
    present = np.fromiter((not w.isascii() or len(w) > MAX_SUBSTRING or w.decode() in vocabulary for w in raw),
                          dtype=bool, count=len(raw))
    keep = None
    sides = {}
    for side in ("ref", "par"):
        _check(cancelled)
        ids = np.load(index / f"{side}_ids.npy")
        counts = np.load(index / f"{side}_counts.npy").astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        if len(ids):
            ok = np.logical_and.reduceat(present[ids], np.minimum(starts, len(ids) - 1))
            ok[counts == 0] = True  # reduceat yields the next entry's first word for an empty segment
        else:
            ok = np.ones(len(counts), dtype=bool)
        keep = ok if keep is None else keep & ok
        sides[side] = (ids, counts)
    _check(cancelled)
    refs = _lines_of(words, *sides["ref"], keep)
    _check(cancelled)
    pars = _lines_of(words, *sides["par"], keep)
    _check(cancelled)
    text = "".join(f"1\n{r}\n{p}\n" for r, p in zip(refs, pars)).encode()
    return gzip.compress(text, compresslevel=1), len(refs)


def filter_table(table: Path, vocabulary: set[str], out: Path, root: Path | None = None) -> int:
    """`filtered()` written to the file `out`; returns the number of entries."""
    data, n = filtered(table, vocabulary, root)
    out.write_bytes(data)
    return n


# METEOR Normalizer's alphanumeric class; its rules only ever act on or next to other characters.
_ALNUM = re.compile("[0-9A-Za-z\u0160\u017D\u0161\u017E\u0178\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u017E]+")


def _lowered(s: str) -> tuple[str, ...]:
    # Python's lower() and a per-character one (no final-sigma context): covers Java's toLowerCase() either way.
    return (s, s.lower(), "".join(c.lower() for c in s))


def vocabulary(segments: list[str]) -> set[str]:
    """A superset of the words METEOR 1.5 `-l en -norm` sees in `segments` (the strings between its `|||`s, before
    its trim): `Normalizer.normalizeLine(s, en, true).toLowerCase()` split by StringTokenizer.

    A StringTokenizer token made only of the Normalizer's alphanumerics (and not containing its DOTMULTI escape) comes
    out unchanged, only lowercased: every rule needs a non-alphanumeric character inside the token. Any other token
    comes out as pieces, each a substring of the token after some of the Normalizer's character rewrites (quotes to '
    and \", en dash and -- to -, dots deleted in U.S.-like words), lowercased; all such substrings are included, up to
    MAX_SUBSTRING characters (filtered() keeps every longer table word), so a long token costs linear time."""
    vocab: set[str] = set()
    for seg in segments:
        for tok in _TOKEN_SPLIT.split(seg):
            if not tok:
                continue
            if _ALNUM.fullmatch(tok) and "DOTMULTI" not in tok:
                vocab.update(_lowered(tok))
                continue
            quoted = re.sub("[`\u2018\u2019]", "'", tok)
            quoted = re.sub("[\u201C\u201D]|''", '"', quoted)
            dashed = quoted.replace("\u2013", "-").replace("--", "-")
            bases = {tok, quoted, dashed}
            bases |= {b.replace(".", "") for b in bases}
            for base in {v for b in bases for v in _lowered(b)}:
                n = len(base)
                vocab.update(base[i:j] for i in range(n) for j in range(i + 1, min(n, i + MAX_SUBSTRING) + 1))
    return vocab

