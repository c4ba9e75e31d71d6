"""The E2E NLG Challenge data formats: the (mr, ref) CSV, MR parsing, grouping references by MR.

The dataset (Novikova et al. 2017) ships CSVs with columns `mr` and `ref`, one row per human reference, several
rows per meaning representation (MR). Scorers and our test set work on MRs in order of first appearance.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from stages.lib.cli import InputError

# One MR slot: `key[value]`, key letters and spaces, value anything but brackets; slots separated by commas.
_SLOT = re.compile(r"\s*([A-Za-z][A-Za-z ]*?)\s*\[([^\[\]]*)\]\s*")


class DataError(InputError):
    """Bad input data; the message names the file and line."""


def read_text(path: str | Path) -> str:
    """A UTF-8 file's text (BOM stripped, CRLF normalised); a clear error names a missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def read_e2e_csv(path: str | Path) -> list[tuple[str, str]]:
    """(mr, ref) rows of an E2E CSV; header case-insensitive, other columns ignored."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path)))
    header = [h.strip().lower() for h in next(reader, [])]
    if "mr" not in header or "ref" not in header:
        raise DataError(f"{path}: line 1: expected a header with 'mr' and 'ref' columns, got {header}")
    i_mr, i_ref = header.index("mr"), header.index("ref")
    rows = []
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {line_no}: {len(row)} fields, header has {len(header)}")
        rows.append((row[i_mr].strip(), row[i_ref].strip()))
    return rows


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """`name[The Eagle], food[French]` -> [("name", "The Eagle"), ("food", "French")].

    Strict: unbalanced brackets, an empty key or value, text outside `key[value]` or a repeated key is a
    ValueError, never repaired (a repaired MR would train and score on something the data does not say).
    """
    slots, pos = [], 0
    while True:
        m = _SLOT.match(mr, pos)
        if not m:
            rest = mr[pos:].strip()
            at = f"at {rest[:40]!r}" if rest else "at the end"
            raise ValueError(f"malformed MR {mr!r}: expected key[value] {at}")
        key, value = m.group(1).strip(), m.group(2).strip()
        if not value:
            raise ValueError(f"malformed MR {mr!r}: empty value for {key!r}")
        if any(key == k for k, _ in slots):
            raise ValueError(f"malformed MR {mr!r}: {key!r} appears twice")
        slots.append((key, value))
        pos = m.end()
        if pos == len(mr):
            return slots
        if mr[pos] != ",":
            raise ValueError(f"malformed MR {mr!r}: expected ',' between slots at {mr[pos:pos + 40]!r}")
        pos += 1


def group_by_mr(rows: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[(mr, [ref, ...])] with one entry per distinct MR, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return list(groups.items())
