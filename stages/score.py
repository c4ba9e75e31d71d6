"""Score system outputs with the five E2E NLG Challenge metrics: a faster drop-in for the official scorer
(e2e-metrics measure_scores.py, default Perl mode), giving its values without Perl and with one JVM (METEOR).

    python -m stages.score --refs REFS --predictions PRED [--output FILE] [--extra FILE ...]

REFS: an E2E CSV (`mr`, `ref` columns; references grouped per MR in order of first appearance) or a text file (the
references of one instance on consecutive lines, instances separated by empty lines; a file without empty lines
holds one reference per instance). PRED: one output per line, one line per instance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.e2e import DataError, group_by_mr, read_e2e_csv, read_text
from stages.metrics import JavaError, score
from stages.outputs import atomic_file

__all__ = ["score", "load_refs", "load_predictions", "main"]
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
# measure_scores.py read_tsv repairs these mis-encodings in CSV files before parsing.
_MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def _lines(path: str | Path) -> list[str]:
    # Like the official reader (codecs line iteration + strip): every Unicode line break splits, whitespace is trimmed.
    return [line.strip() for line in read_text(path).splitlines()]


def load_predictions(path: str | Path) -> list[str]:
    """One output per line (trimmed); an empty line is an empty output."""
    return _lines(path)


def load_refs(path: str | Path) -> list[list[str]]:
    """References per instance from an E2E CSV (`.csv`) or a blank-line-separated text file."""
    if Path(path).suffix.lower() == ".csv":
        rows = [(_fix(mr), _fix(ref)) for mr, ref in read_e2e_csv(path)]
        _warn_scattered_mrs(path, rows)
        return [refs for _, refs in group_by_mr(rows)]
    instances: list[list[str]] = [[]]
    for line in _lines(path):
        if line:
            instances[-1].append(line)
        elif instances[-1]:
            instances.append([])
    instances = [i for i in instances if i]
    if len(instances) == 1:  # no empty lines: measure_scores.py reads a single-reference file, one line per instance
        instances = [[line] for line in instances[0]]
    if not instances:
        raise DataError(f"{path}: no references")
    return instances


def _fix(text: str) -> str:
    for bad, good in _MOJIBAKE:
        text = text.replace(bad, good)
    return text


def _warn_scattered_mrs(path: str | Path, rows: list[tuple[str, str]]) -> None:
    """measure_scores.py groups only consecutive rows of one MR; we group by first appearance (one output per MR).
    The two agree unless an MR's rows are scattered, which the E2E files never are: say so when it happens."""
    starts = sum(1 for i, (mr, _) in enumerate(rows) if i == 0 or rows[i - 1][0] != mr)
    distinct = len({mr for mr, _ in rows})
    if starts != distinct:
        print(f"warning: {path}: some MRs' rows are not consecutive; grouped by MR ({distinct} instances), "
              f"the official scorer would make {starts}", file=sys.stderr)


def _load_extra(paths: list[str]) -> dict:
    extra: dict = {}
    for path in paths:
        try:
            obj = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a JSON object")
        clash = sorted(set(obj) & set(METRICS))
        if clash:
            raise DataError(f"{path}: keys {clash} collide with metric names")
        extra.update(obj)
    return extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--refs", required=True, help="E2E CSV (mr, ref) or blank-line-separated text references")
    ap.add_argument("--predictions", required=True, help="one output per line")
    ap.add_argument("--output", type=Path, help="write the JSON here (atomically) instead of stdout")
    ap.add_argument("--extra", action="append", default=[], help="JSON object merged into the output (repeatable)")
    args = ap.parse_args(argv)
    try:
        extra = _load_extra(args.extra)
        refs = load_refs(args.refs)
        preds = load_predictions(args.predictions)
        if len(preds) != len(refs):
            raise DataError(f"{args.predictions}: {len(preds)} predictions but {args.refs} has {len(refs)} instances")
        empty = sum(1 for p in preds if not p)
        if empty:
            print(f"warning: {args.predictions}: {empty} empty prediction line(s), scored as empty outputs",
                  file=sys.stderr)
        result = {**score(refs, preds), **extra}
    except (DataError, JavaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        with atomic_file(args.output) as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
