"""compare: the paper's sweep tables from DVC experiments, e.g. metrics by LoRA rank (Table 6) or targets (Table 5).

    python -m stages.tools.compare [--by lora.rank] [--metrics 'metrics/scores/lora-s*.json'] [--plot rank.png] [--json FILE]

Reads `dvc exp show --json` (or FILE, saved from it) with pandas and prints a Markdown table: one row per value of
the --by parameter, the five E2E metrics in the paper's units (BLEU, METEOR, ROUGE-L in %, NIST and CIDEr raw),
mean ± sample std (n - 1) over the runs sharing that value, and n. Every metrics file matching --metrics in a run
is one sample, so a run that scores several seeds contributes each. Another parameter that also differs between the
runs (say lora.targets in a rank table) becomes a column, so different settings are never averaged together; seeds
(train.seeds) are what is averaged over. Runs without metrics (queued, running, failed) are listed
under the table, never dropped silently: DVC shows a failed or running queued experiment with the metrics left in
the workspace by another run, so only finished runs' files count. The workspace row is not counted (after
`dvc exp run` it repeats the last experiment; after an edit its metrics may be stale).
Not a DVC stage: a tool run after a sweep.
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd

from stages.lib import cli
from stages.lib.cli import InputError
from stages.lib.metrics import METRICS as E2E_METRICS

# key in the metrics file, column title, factor to the paper's units for a fraction file, decimals (paper Table 3).
# A metrics file names its units (stages/score.py --units); one without the key is the scorer's fractions.
METRICS = tuple((key, title, 100 if percent else 1, 1 if percent else 2) for key, title, percent in E2E_METRICS)
AVERAGED = ("train.seeds",)  # what runs of one setting differ by
DONE = (None, "success")  # executor state of a finished run: None for `dvc exp run` and commits


class CompareError(InputError):
    pass


def exp_show(path: str | None) -> list:
    """`dvc exp show --json`'s list: from `path`, or by running dvc in the current directory."""
    if path is not None:
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CompareError(f"--json: {path}: {e}") from None
    try:
        done = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    except FileNotFoundError:
        raise CompareError("dvc: not found on PATH (activate the project's virtual environment)") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["no message"]
        why = next((line for line in lines if line.startswith("ERROR")), lines[-1])  # not DVC's "troubles?" footer
        raise CompareError(f"dvc exp show --json failed (exit {done.returncode}): {why}")
    return json.loads(done.stdout)


def flatten(node, prefix: str = "") -> dict:
    """{"lora": {"rank": 4}} -> {"lora.rank": 4}; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def experiments(show: list) -> list[dict]:
    """Every committed baseline and experiment: name, state, error, params (flattened), metrics files."""
    if not isinstance(show, list):
        raise CompareError(f"exp show JSON: expected a list, got {type(show).__name__}")
    out = []

    def add(rev: dict, state):
        data = rev.get("data") or {}
        params = {}
        for file, entry in (data.get("params") or {}).items():
            pre = "" if file == "params.yaml" else f"{file}:"
            params.update({pre + k: v for k, v in flatten((entry or {}).get("data") or {}).items()})
        out.append({"name": rev.get("name") or str(rev.get("rev", "?"))[:7], "state": state,
                    "error": (rev.get("error") or {}).get("msg") if rev.get("error") else None,
                    "params": params, "metrics": data.get("metrics") or {}})

    for top in show:
        if top.get("rev") == "workspace":
            continue
        add(top, None)
        for exp in top.get("experiments") or []:
            revs = exp.get("revs") or []
            if revs:  # DVC 3: one rev per experiment
                add(revs[0], (exp.get("executor") or {}).get("state"))
    return out


def samples(exps: list[dict], pattern: str) -> tuple[list[dict], list[str]]:
    """One row per (finished run, metrics file matching `pattern`), in the paper's units; and what is missing."""
    rows, missing, seen = [], [], {}
    for e in exps:
        if e["state"] not in DONE or e["error"]:
            missing.append(f"{e['name']} ({e['error'] or e['state']})")
            continue
        files = sorted(f for f in e["metrics"] if fnmatch.fnmatch(f, pattern))
        if not files:
            missing.append(f"{e['name']} (no {pattern})")
        for f in files:
            entry = e["metrics"][f] or {}
            data = flatten(entry.get("data") or {})
            lacking = [k for k, *_ in METRICS if k not in data]
            if entry.get("error") or lacking:
                why = (entry.get("error") or {}).get("msg") or f"no {', '.join(lacking)}"
                missing.append(f"{e['name']} ({f}: {why})")
                continue
            row = {"run": e["name"] if len(files) == 1 else f"{e['name']}:{f}", "params": e["params"]}
            units = data.get("units", "fraction")
            if units not in ("fraction", "paper"):
                raise CompareError(f"{e['name']}: {f}: units = {units!r}, expected 'fraction' or 'paper'")
            for key, title, factor, _ in METRICS:
                v = data[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise CompareError(f"{e['name']}: {f}: {key} = {v!r} is not a finite number")
                if units == "fraction" and factor == 100 and not 0 <= v <= 1:  # never print a BLEU of 7040 %
                    raise CompareError(f"{e['name']}: {f}: {key} = {v!r} is not a fraction, and the file names no "
                                       "units (stages/score.py writes units: paper)")
                row[title] = v * (factor if units == "fraction" else 1)
            # The same run shown twice (a commit and the experiment it came from; an experiment re-run with
            # nothing changed, which is deterministic) is one sample, not two: it would shrink the std.
            same = json.dumps([e["params"], f, [data[k] for k, *_ in METRICS]], sort_keys=True, default=str)
            if same in seen:
                missing.append(f"{row['run']} (same params and metrics as {seen[same]})")
                continue
            seen[same] = row["run"]
            rows.append(row)
    return rows, missing


def check_by(by: str, exps: list[dict]) -> None:
    keys = sorted({k for e in exps for k in e["params"]})
    if by not in keys:
        near = difflib.get_close_matches(by, keys, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise CompareError(f"--by: no experiment has the parameter {by!r}{hint} (parameters: {', '.join(keys)})")


def show_value(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "—" if v is None else str(v)


def sort_key(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v, "")
    if isinstance(v, list):
        return (1, len(v), show_value(v))
    return (2, 0, show_value(v))


def aggregate(rows: list[dict], by: str) -> tuple[pd.DataFrame, list[str]]:
    """Mean, sample std and n per setting; the settings' columns are --by and any other parameter that differs."""
    keys = sorted({k for r in rows for k in r["params"]})
    varying = [k for k in keys if k != by and k not in AVERAGED
               and len({show_value(r["params"].get(k)) for r in rows}) > 1]
    cols = [by] + varying
    df = pd.DataFrame([{**{c: show_value(r["params"].get(c)) for c in cols}, "run": r["run"],
                        "_order": tuple(sort_key(r["params"].get(c)) for c in cols),
                        **{t: r[t] for _, t, _, _ in METRICS}} for r in rows])
    df = df.sort_values("_order", kind="stable")
    g = df.groupby(cols, sort=False)
    titles = [t for _, t, _, _ in METRICS]
    out = g[titles].mean().add_suffix(" mean").join(g[titles].std(ddof=1).add_suffix(" std"))
    out = out.join(g["run"].agg(list)).join(g.size().rename("n")).reset_index()
    return out, cols


def markdown(table: pd.DataFrame, cols: list[str], missing: list[str], pattern: str) -> str:
    head = cols + ["n"] + [t for _, t, _, _ in METRICS] + ["runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in cols or h == "runs" else "---:"
                                                        for h in head) + "|"]
    for _, r in table.iterrows():
        cells = [str(r[c]) for c in cols] + [str(r["n"])]
        for _, t, _, dec in METRICS:
            m, s = r[f"{t} mean"], r[f"{t} std"]
            cells.append(f"{m:.{dec}f}" if r["n"] == 1 else f"{m:.{dec}f} ± {s:.{dec}f}")
        cells.append(", ".join(r["run"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{pattern}: mean ± sample std over n runs; BLEU, METEOR, ROUGE-L in %, NIST and CIDEr raw "
                  "(the paper's units). The workspace is not counted."]
    if missing:
        lines += ["", f"Not counted ({len(missing)}): " + "; ".join(missing)]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, cols: list[str], path: str) -> None:
    """Each metric against the --by value, one line per setting of the other differing parameters."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by, rest = cols[0], cols[1:]
    xs = list(dict.fromkeys(table[by]))  # in table order (numeric where numeric)
    numeric = all(_is_number(x) for x in xs)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    groups = table.groupby(rest, sort=False) if rest else [((), table)]
    for label, part in groups:
        x = [float(v) if numeric else xs.index(v) for v in part[by]]
        name = ", ".join(f"{c}={v}" for c, v in zip(rest, label if isinstance(label, tuple) else (label,)))
        for ax, (_, t, _, _) in zip(axes, METRICS):
            ax.errorbar(x, part[f"{t} mean"], yerr=part[f"{t} std"].fillna(0), marker="o", capsize=3,
                        label=name or None)
    for ax, (_, t, factor, _) in zip(axes, METRICS):
        ax.set_title(t + (" (%)" if factor == 100 else ""))
        ax.set_xlabel(by)
        if numeric:
            ax.set_xscale("log", base=2)  # ranks 1, 2, 4, 8, 64 as in Table 6
            ax.set_xticks([float(v) for v in xs], xs)
        else:
            ax.set_xticks(range(len(xs)), xs, rotation=30)
    if rest:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"E2E metrics against {by}: mean over runs, error bars one sample std", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same table, same bytes
    plt.close(fig)


def _is_number(s: str) -> bool:
    try:
        return float(s) > 0
    except ValueError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--by", default="lora.rank", help="parameter whose values are the rows (lora.rank, lora.targets)")
    ap.add_argument("--metrics", default="metrics/scores/lora-s*.json",
                    help="metrics file(s) of the method compared, a glob (each match in a run is one sample)")
    ap.add_argument("--json", help="read this saved `dvc exp show --json` output instead of running dvc")
    ap.add_argument("--plot", help="write a PNG of each metric against --by")
    args = ap.parse_args(argv)

    exps = experiments(exp_show(args.json))
    check_by(args.by, exps)
    rows, missing = samples(exps, args.metrics)
    if not rows:
        raise CompareError(f"no finished experiment has {args.metrics}"
                           + (f"; not counted: {'; '.join(missing)}" if missing else "")
                           + " (queue runs with `dvc exp run --queue -S ...`, then `dvc queue start`)")
    table, cols = aggregate(rows, args.by)
    sys.stdout.write(markdown(table, cols, missing, args.metrics))
    if args.plot:
        plot(table, cols, args.plot)
        print(f"compare: plot -> {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("compare", main))
