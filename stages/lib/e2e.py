"""The E2E NLG Challenge data formats: the (mr, ref) CSV, MR parsing, grouping references by MR.

The dataset (Novikova et al. 2017) ships CSVs with columns `mr` and `ref`, one row per human reference, several
rows per meaning representation (MR). Scorers and our test set work on MRs in order of first appearance.

An MR is a list of slots in one of two spellings, both read by one grammar (`parse_mr`, `parse_authors_mr`,
`parse_any_mr`): the official `name[The Eagle], food[French]` and the LoRA authors' re-serialisation
`name : The Eagle | food : French`. In both, a key is letters and inner spaces, a value is non-empty and holds no
bracket, no key comes twice, and nothing in the MR is a control character (a NUL, tab or newline would reach the
tokenizer, and the scorers' one-line formats, unseen). In the authors' spelling `:` and `|` are the delimiters, so
a value cannot hold them; space around them is free. Anything else is a ValueError naming the MR and the fault,
never repaired: a repaired MR would train and score on something the data does not say.
"""
from __future__ import annotations

import csv
import io
import re
import unicodedata
from pathlib import Path

from stages.lib.cli import InputError

# One MR slot: `key[value]`, key letters and spaces, value anything but brackets; slots separated by commas.
_SLOT = re.compile(r"\s*([A-Za-z][A-Za-z ]*?)\s*\[([^\[\]]*)\]\s*")
_KEY = re.compile(r"[A-Za-z](?:[A-Za-z ]*[A-Za-z])?")  # a slot key, stripped: `name`, `customer rating`
# The official spelling starts with its first key and a bracket; anything else is read as the authors' spelling.
_OFFICIAL = re.compile(r"\s*[A-Za-z][A-Za-z ]*\[")


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


def _check_chars(mr: str) -> None:
    bad = next((i for i, c in enumerate(mr) if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ValueError(f"malformed MR {mr!r}: control character U+{ord(mr[bad]):04X} at character {bad + 1}")


def _add_slot(mr: str, slots: list[tuple[str, str]], key: str, value: str) -> None:
    """The slot rules both spellings share: appends (key, value), stripped, or raises naming the fault."""
    key, value = key.strip(), value.strip()
    if not key:
        raise ValueError(f"malformed MR {mr!r}: empty key before {value[:40]!r}")
    if not _KEY.fullmatch(key):
        raise ValueError(f"malformed MR {mr!r}: key {key!r} is not letters and spaces")
    if not value:
        raise ValueError(f"malformed MR {mr!r}: empty value for {key!r}")
    if "[" in value or "]" in value:
        raise ValueError(f"malformed MR {mr!r}: a bracket in the value of {key!r}")
    if any(key == k for k, _ in slots):
        raise ValueError(f"malformed MR {mr!r}: {key!r} appears twice")
    slots.append((key, value))


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """`name[The Eagle], food[French]` -> [("name", "The Eagle"), ("food", "French")].

    Strict (the module docstring's grammar): unbalanced brackets, an empty key or value, text outside `key[value]`,
    a repeated key or a control character is a ValueError, never repaired.
    """
    _check_chars(mr)
    slots: list[tuple[str, str]] = []
    pos = 0
    while True:
        m = _SLOT.match(mr, pos)
        if not m:
            rest = mr[pos:].strip()
            at = f"at {rest[:40]!r}" if rest else "at the end"
            raise ValueError(f"malformed MR {mr!r}: expected key[value] {at}")
        _add_slot(mr, slots, m.group(1), m.group(2))
        pos = m.end()
        if pos == len(mr):
            return slots
        if mr[pos] != ",":
            raise ValueError(f"malformed MR {mr!r}: expected ',' between slots at {mr[pos:pos + 40]!r}")
        pos += 1


def parse_authors_mr(mr: str) -> list[tuple[str, str]]:
    """The LoRA authors' spelling, `name : Blue Spice | Type : coffee shop` -> [("name", "Blue Spice"),
    ("Type", "coffee shop")], keys and values as written (fidelity maps them to the official ones); the same
    slot rules as parse_mr (the module docstring's grammar)."""
    _check_chars(mr)
    if "[" in mr or "]" in mr:
        raise ValueError(f"malformed MR {mr!r}: a bracket in a 'key : value | ...' MR")
    slots: list[tuple[str, str]] = []
    for part in mr.split("|"):
        key, sep, value = part.partition(":")
        if not part.strip():
            raise ValueError(f"malformed MR {mr!r}: an empty slot (expected 'key : value' between each '|')")
        if not sep:
            raise ValueError(f"malformed MR {mr!r}: expected 'key : value' at {part.strip()[:40]!r}")
        if ":" in value:
            raise ValueError(f"malformed MR {mr!r}: more than one ':' in {part.strip()[:40]!r}")
        _add_slot(mr, slots, key, value)
    return slots


def is_official_mr(mr: str) -> bool:
    """Whether `mr` is in the official spelling (it starts `key[`); parse_any_mr reads any other as the authors'."""
    return bool(_OFFICIAL.match(mr))


def parse_any_mr(mr: str) -> list[tuple[str, str]]:
    """An MR in either spelling: the official one if it starts `key[`, else the authors' (errors as theirs)."""
    if not isinstance(mr, str):
        raise ValueError(f"malformed MR {mr!r}: not a string")
    return parse_mr(mr) if is_official_mr(mr) else parse_authors_mr(mr)


def group_by_mr(rows: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[(mr, [ref, ...])] with one entry per distinct MR, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return list(groups.items())
