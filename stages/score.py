"""Score system outputs with the five E2E NLG Challenge metrics: a faster drop-in for the official scorer
(e2e-metrics measure_scores.py), giving its values without Perl and with one JVM (METEOR), in either of its modes.

    python -m stages.score --refs REFS --predictions PRED [-p | --mode perl|python] [--units fraction|paper]
                           [--output FILE] [--extra FILE ...]

REFS: an E2E CSV (`mr`, `ref` columns; references grouped per MR in order of first appearance) or a text file (the
references of one instance on consecutive lines, instances separated by empty lines; a file without empty lines
holds one reference per instance). PRED: one output per line, one line per instance. `--mode perl` (default) is
measure_scores.py's default MT-Eval (mteval-v13a-sig.pl) for BLEU and NIST, `-p` / `--mode python` its `-p`
(pymteval.py); the other three metrics are the same in both. `--units fraction` (default) prints BLEU, METEOR and
ROUGE-L as fractions, as measure_scores.py does; `--units paper` in %, as Table 3 (the pipeline's metrics files).
NIST and CIDEr are unscaled in both. The JSON (keys sorted) records the mode and the units.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.lib import cli
from stages.lib.cli import InputError
from stages.lib.e2e import DataError, group_by_mr, read_e2e_csv, read_text
from stages.lib.outputs import atomic_file, check_writable, exclusive
from stages.lib.protocols import PROTOCOLS
from stages.lib.metrics import PERCENT
from stages.lib.scoring import METRICS, MODES, score

__all__ = ["score", "in_units", "load_refs", "load_predictions", "main"]
RESERVED = (*METRICS, "mode", "units")
# Table 3 prints BLEU, METEOR and ROUGE-L in %, NIST and CIDEr as they come.
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
        groups = group_by_mr(rows)
        for mr, refs in groups:
            if not any(refs):
                raise DataError(f"{path}: MR {mr!r} has no references (its ref fields are empty)")
        return [refs for _, refs in groups]
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


def in_units(metrics: dict[str, float], units: str) -> dict[str, float]:
    """The scorer's values (fractions) in `units`: "fraction" as they are, "paper" with BLEU, METEOR, ROUGE-L x 100."""
    return {k: v * 100 if units == "paper" and k in PERCENT else v for k, v in metrics.items()}


def _non_finite(path: str, constant: str):
    raise DataError(f"{path}: non-finite number {constant}")


def _load_extra(paths: list[str]) -> dict:
    extra: dict = {}
    for path in paths:
        try:
            obj = json.loads(read_text(path), parse_constant=lambda c: _non_finite(path, c))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a JSON object")
        clash = sorted(set(obj) & set(RESERVED))
        if clash:
            raise DataError(f"{path}: keys {clash} collide with metric names")
        extra.update(obj)
    return extra


def _check_writable(path: Path) -> None:
    """Fail before scoring if `path` cannot be written (a missing folder is created, as for every stage)."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file path for --output")
    try:
        check_writable(path)
    except InputError as e:
        raise DataError(str(e)) from None


def _write_atomically(path: Path, text: str) -> None:
    """The whole file or none (a sibling temporary renamed over `path`), with the user's umask."""
    with atomic_file(path) as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--refs", required=True, help="E2E CSV (mr, ref) or blank-line-separated text references")
    ap.add_argument("--predictions", required=True, help="one output per line")
    ap.add_argument("--mode", choices=sorted(MODES) + ["auto"], default="perl",
                    help="BLEU/NIST as measure_scores.py's default Perl MT-Eval (perl) or its -p Python one (python); "
                         "auto: the one --protocol uses")
    ap.add_argument("-p", "--python", dest="mode", action="store_const", const="python", help="same as --mode python")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS),
                    help="with --mode auto: authors scores as the LoRA authors did (python), e2e as the challenge (perl)")
    ap.add_argument("--units", choices=("fraction", "paper"), default="fraction",
                    help="BLEU, METEOR, ROUGE-L as fractions (the official scorer's output) or in %% (the paper's)")
    ap.add_argument("--output", type=Path, help="write the JSON here (atomically) instead of stdout")
    ap.add_argument("--extra", action="append", default=[], help="JSON object merged into the output (repeatable)")
    args = ap.parse_args(argv)
    if args.mode == "auto":
        if args.protocol is None:
            ap.error("--mode auto needs --protocol authors|e2e")
        args.mode = PROTOCOLS[args.protocol].score_mode
    if args.output:
        _check_writable(args.output)
    with exclusive(args.output):  # one run per output file (none for stdout)
        extra = _load_extra(args.extra)
        refs = load_refs(args.refs)
        preds = load_predictions(args.predictions)
        if len(preds) != len(refs):
            raise DataError(f"{args.predictions}: {len(preds)} predictions but {args.refs} has {len(refs)} instances")
        empty = sum(1 for p in preds if not p)
        if empty:
            print(f"warning: {args.predictions}: {empty} empty prediction line(s), scored as empty outputs",
                  file=sys.stderr)
        result = {**in_units(score(refs, preds, mode=args.mode), args.units), "mode": args.mode,
                  "units": args.units, **extra}
        text = json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n"
        if args.output:
            try:
                _write_atomically(args.output, text)
            except OSError as e:
                raise DataError(f"{args.output}: cannot write ({e.strerror or e})") from None
        else:
            sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("score", main))  # one line and exit 2 for bad input, SIGTERM/SIGHUP as a clean exit
