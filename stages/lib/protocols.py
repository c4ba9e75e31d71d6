"""The two protocols (params.yaml `protocol`) as one table: every stage asks it, none repeats it.

A protocol is which E2E files a run trains and is scored on, how their lines are read and checked, how the test
references are grouped per MR, how BLEU and NIST are computed, and how the report names it. README, "Two
protocols", says why there are two.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stages.lib import authors_data
from stages.lib.e2e import DataError, group_by_mr, parse_mr, read_e2e_csv

Rows = list[tuple[str, str]]


def _read_csv(path: str | Path) -> Rows:
    """An official CSV's (mr, ref) rows, each MR parsed strictly and each reference non-empty."""
    rows = read_e2e_csv(path)
    if not rows:
        raise DataError(f"{path}: empty split (no data rows)")
    for i, (mr, ref) in enumerate(rows, start=1):
        where = f"{path}: data row {i} (line {i + 1})"
        try:
            parse_mr(mr)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if not ref:
            raise DataError(f"{where}: empty reference")
    return rows


@dataclass(frozen=True)
class Protocol:
    name: str
    # split -> (name in data/raw, names accepted in a local data.source directory, the upstream's first)
    files: dict[str, tuple[str, tuple[str, ...]]]
    read: Callable[[str | Path], Rows]  # (MR, reference) rows, checked; errors name the file and line
    # test rows -> [(MR, [references])] per MR in order of first appearance, as this protocol scores them
    group: Callable[[Rows], list[tuple[str, list[str]]]]
    score_mode: str  # BLEU and NIST: "python" (measure_scores.py -p) or "perl" (its default)
    label: str  # the report's words

    def raw_name(self, split: str) -> str:
        return self.files[split][0]


PROTOCOLS = {
    "authors": Protocol(
        "authors",
        {"train": ("train.txt", ("train.txt",)), "validation": ("valid.txt", ("valid.txt",)),
         "test": ("test.txt", ("test.txt",))},
        authors_data.read_authors_file, authors_data.group_references, "python",
        "the LoRA authors' protocol (their E2E text files, gpt2_beam.py decoding, the official scorer's -p mode), "
        "the one that produced the paper's numbers"),
    "e2e": Protocol(
        "e2e",
        {"train": ("train.csv", ("trainset.csv", "train.csv")), "validation": ("dev.csv", ("devset.csv", "dev.csv")),
         "test": ("test.csv", ("testset_w_refs.csv", "test.csv"))},
        _read_csv, group_by_mr, "perl",
        "the official E2E protocol (the challenge's CSVs and the official scorer's default Perl mode), comparable "
        "with the E2E challenge's systems; the paper's rows used the authors' protocol"),
}
