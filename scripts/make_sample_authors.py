"""Developer tool: write the authors' E2E text files (train.txt, valid.txt, test.txt) of data/sample/, row for row like its CSVs.

data/sample/{trainset,devset}.csv were cut from the official E2E *development* set and testset_w_refs.csv from
the official test set (see data/sample/README.md). The LoRA authors' valid.txt and test.txt hold the same rows
in the same order, in their own text (microsoft/LoRA examples/NLG/data/e2e/, commit c4593f0). So each sample row
(mr, ref) is found in the official CSV, and the authors' line with the same row number is copied unchanged.
Checks on the way: both files have the same number of rows, and their MR groupings are the same partition of
the rows (one authors' MR per official MR and back). Deterministic; rerunning it reproduces the shipped files.

    python scripts/make_sample_authors.py ../shared data/sample data/sample
"""
import argparse
import re
from collections import defaultdict
from pathlib import Path

import yaml

from stages.lib.authors_data import read_authors_file
from stages.lib.e2e import read_e2e_csv
from stages.lib.outputs import git_blob_id

PINS = yaml.safe_load((Path(__file__).resolve().parents[1] / "data" / "upstream.yaml").read_text())["authors"]

PAIRS = [  # (sample CSV, official CSV, authors' file, output)
    ("trainset.csv", "e2e/devset.csv", "e2e-authors/valid.txt", "train.txt"),
    ("devset.csv", "e2e/devset.csv", "e2e-authors/valid.txt", "valid.txt"),
    ("testset_w_refs.csv", "e2e/testset_w_refs.csv", "e2e-authors/test.txt", "test.txt"),
]


def letters(text: str) -> str:
    return re.sub(r"\W", "", text)


def aligned_lines(official: list[tuple[str, str]], authors_path: Path) -> list[str]:
    """The authors' raw lines (newline kept), checked to be row-aligned with `official`."""
    assert git_blob_id(authors_path.read_bytes()) == PINS[authors_path.name]["git_blob"], authors_path  # the pin
    rows = read_authors_file(authors_path)
    raw = authors_path.read_bytes().decode("utf-8").splitlines(keepends=True)
    assert len(raw) == len(rows) == len(official), (authors_path, len(raw), len(rows), len(official))
    to_authors, to_official = {}, {}
    for (mr, _), (ctx, _) in zip(official, rows):
        assert to_authors.setdefault(mr, ctx) == ctx and to_official.setdefault(ctx, mr) == mr, (mr, ctx)
    same = sum(letters(ref) == letters(comp) for (_, ref), (_, comp) in zip(official, rows))
    print(f"{authors_path}: {len(rows)} rows, {len(to_authors)} MRs in both; references equal up to spaces and "
          f"punctuation: {same}/{len(rows)}")
    return raw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shared", help="the shared data folder (holds e2e/ and e2e-authors/)")
    ap.add_argument("sample", help="data/sample")
    ap.add_argument("out", help="data/sample")
    a = ap.parse_args()
    shared, sample, out = Path(a.shared), Path(a.sample), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = {}
    for sample_csv, official_csv, authors_txt, out_name in PAIRS:
        official = read_e2e_csv(shared / official_csv)
        if authors_txt not in cache:
            cache[authors_txt] = aligned_lines(official, shared / authors_txt)
        raw = cache[authors_txt]
        where = defaultdict(list)                    # (mr, ref) -> its row numbers in the official CSV
        for i, row in enumerate(official):
            where[row].append(i)
        picked = [where[row].pop(0) for row in read_e2e_csv(sample / sample_csv)]
        (out / out_name).write_bytes("".join(raw[i] for i in picked).encode("utf-8"))
        print(f"{out / out_name}: {len(picked)} rows")


if __name__ == "__main__":
    main()
