"""The LoRA authors' own E2E text files: `MR||reference` lines, read as their scripts read them.

Source: microsoft/LoRA at commit c4593f060e6a368d7bb5af5273b8e42810cdef90, examples/NLG/:
- examples/NLG/data/e2e/{train,valid,test}.txt: one (MR, reference) pair per line, e.g.
  `name : Blue Spice | Type : coffee shop | area : city centre||A coffee shop in the city centre area called Blue
  Spice . ` (MR re-serialised, reference whitespace-tokenised; rows in the official CSVs' order).
- src/format_converting_e2e.py lines 12-18: `items = line.strip().split('||')`, context = items[0] (the MR as
  is), completion = items[1]. So leading/trailing whitespace of the line goes, the MR keeps everything up to the
  first `||` (no trailing-space strip of its own), the reference is what follows it.
- src/gpt2_encode.py lines 55-61, run with `--add_bos --add_eos` (create_datasets.sh lines 6-14):
  tokens(context) + [50256] is the query, tokens(" " + completion) + [50256] the target.
- src/gpt2_decode.py lines 104-113 and 133: references are grouped by the context string, in order of first
  appearance, each cut by `.split('<|endoftext|>')[0].split('\\n\\n')[0].strip()`; line 131 cuts the decoded
  prediction the same way.
Where their scripts would crash (no `||`) or silently drop text (a second `||`), or keep an empty MR or
reference, we stop with an error naming the file and line. Each MR must also be well-formed under the grammar the
official CSVs' MRs obey (stages/lib/e2e.py: `key : value` slots separated by `|`, non-empty keys and values, no
key twice, no brackets, no control characters): their scripts never parse an MR, but our fidelity measure does,
and a test MR it cannot read must stop preprocess, not the generate stage after decoding.
"""
from __future__ import annotations

import re
from pathlib import Path

from stages.lib.e2e import DataError, parse_authors_mr

SEP = "||"
_NEWLINE = re.compile(rb"\r\n|\r|\n")


class AuthorsDataError(DataError):
    """A malformed authors' E2E file; the message names the file and line (stages exit 2 on DataError)."""


def cut_like_gpt2_decode(text: str) -> str:
    """gpt2_decode.py lines 113 and 131: text before the first <|endoftext|>, then before the first blank line,
    stripped."""
    return text.split("<|endoftext|>")[0].split("\n\n")[0].strip()


def decode_utf8(path: str | Path, data: bytes) -> str:
    """UTF-8 text (a leading BOM dropped); a non-UTF-8 byte is an error naming its line."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = len(_NEWLINE.findall(data[:e.start])) + 1
        raise AuthorsDataError(f"{path}: line {line}: not UTF-8 (byte 0x{data[e.start]:02x})") from None


def parse_authors_text(text: str, source: str | Path) -> list[tuple[str, str]]:
    """(context, completion) per line, as format_converting_e2e.py produces them; `source` names the file in
    errors. Lines split like Python's text-mode reading (\\n, \\r\\n or \\r)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()                                  # the final newline ends the last line, it is not a line
    if not lines:
        raise AuthorsDataError(f"{source}: no lines")
    rows = []
    for n, line in enumerate(lines, start=1):
        items = line.strip().split(SEP)
        if len(items) < 2:
            raise AuthorsDataError(f"{source}: line {n}: no '{SEP}' between MR and reference")
        if len(items) > 2:
            raise AuthorsDataError(f"{source}: line {n}: more than one '{SEP}' (the authors' script would drop "
                                   f"the text after the second)")
        context, completion = items
        if not context.strip():
            raise AuthorsDataError(f"{source}: line {n}: empty MR")
        try:
            parse_authors_mr(context)
        except ValueError as e:
            raise AuthorsDataError(f"{source}: line {n}: {e}") from None
        if not completion:
            raise AuthorsDataError(f"{source}: line {n}: empty reference")
        rows.append((context, completion))
    return rows


def read_authors_file(path: str | Path) -> list[tuple[str, str]]:
    """(context, completion) rows of one authors' file (download-data checked its git blob id against the pin)."""
    path = Path(path)
    if not path.is_file():
        raise AuthorsDataError(f"{path}: no such file")
    return parse_authors_text(decode_utf8(path, path.read_bytes()), path)


def group_references(rows: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[(context, [reference, ...])] per distinct context string, in order of first appearance, each reference
    cut as gpt2_decode.py cuts it (line 113): the test references the authors score against."""
    groups: dict[str, list[str]] = {}
    for context, completion in rows:
        groups.setdefault(context, []).append(cut_like_gpt2_decode(completion))
    return list(groups.items())
