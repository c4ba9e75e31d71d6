"""report: a Markdown table of our runs beside the paper's Table 3, mean ± std over seeds, and offline plots.

The paper's numbers are printed as the paper's, never mixed with ours. When the base model is not GPT-2 Medium
(the offline demo's small stand-in) the report says so: those are miniature numbers, not a reproduction. It reads
exactly the runs of `train.seeds`: a file left by a seed since removed is never averaged in.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from stages.lib import cli  # noqa: E402
from stages.lib import params as P  # noqa: E402
from stages.lib.cli import InputError  # noqa: E402
from stages.lib.metrics import METRICS as E2E_METRICS  # noqa: E402
from stages.lib.metrics import PERCENT  # noqa: E402
from stages.lib.outputs import atomic_dir, atomic_file, exclusive, write_json  # noqa: E402
from stages.lib.protocols import PROTOCOLS  # noqa: E402

METHODS = {"base": "pretrained only (no fine-tuning)", "lora": "LoRA", "full": "full fine-tuning"}
# (key, header, decimals as the paper prints them); the score stage writes them in the paper's units (`--units paper`)
# (key, title, decimals): two more than the paper prints (stages/lib/metrics.py says which are in %)
METRICS = [(key, title, 2 if percent else 4) for key, title, percent in E2E_METRICS]
# Hu et al. 2021, Table 3 (GPT-2 Medium, E2E test set). The FT row is copied there from Li & Liang (2021).
PAPER = {
    "full": {"params": "354.92M", "bleu": "68.2", "nist": "8.62", "meteor": "46.2", "rouge_l": "71.0",
             "cider": "2.47"},
    "lora": {"params": "0.35M", "bleu": "70.4±.1", "nist": "8.85±.02", "meteor": "46.8±.2", "rouge_l": "71.8±.1",
             "cider": "2.53±.02"},
}
# The recipe each method's row followed (params.yaml `<method>.recipe`).
RECIPES = {"authors": "the LoRA authors' recipe", "li_liang": "Li & Liang's recipe"}
GPT2_MEDIUM = {"n_layer": 24, "n_embd": 1024, "vocab_size": 50257}
# MR fidelity (stages/lib/fidelity.py), shown when the score stage wrote it: (key, header, format).
FIDELITY = [("distinct_outputs", "distinct outputs", "{:.0f}"), ("name_realised", "name realised", "{:.0%}"),
            ("slots_realised", "slots realised", "{:.0%}")]


def config(p: P.Params) -> dict:
    return {"protocol": p.protocol, "seeds": list(p.train.seeds),
            "recipes": {"lora": p.lora.recipe, "full": p.full.recipe}}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    bad = [k for k, v in data.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise InputError(f"{path}: non-finite {bad[0]}")
    return data


def read_scores(path: Path) -> dict:
    data = read_json(path)
    if data.get("units") != "paper":  # a fraction file would print a BLEU of 0.70 as 0.70 %
        raise InputError(f"{path}: units {data.get('units')!r}, expected 'paper' (stages.score --units paper)")
    return data


def runs(scores: Path, costs: Path, seeds: list[int]) -> pd.DataFrame:
    """One row per run: base once, each method once per seed; quality and cost columns."""
    rows = [{"method": "base", "seed": None, **read_scores(scores / "base.json")}]
    for method in ("lora", "full"):
        for seed in seeds:
            run = f"{method}-s{seed}"
            rows.append({"method": method, "seed": seed, **read_scores(scores / f"{run}.json"),
                         **read_json(costs / f"train-{run}.json")})
    return pd.DataFrame(rows)


def cell(values: pd.Series, decimals: int) -> str:
    """mean, and ± sample std (n - 1) over seeds when there are several."""
    values = values.dropna()
    if values.empty:
        return "–"
    text = f"{values.mean():.{decimals}f}"
    return text + (f" ± {values.std(ddof=1):.{decimals}f}" if len(values) > 1 else "")


def fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:.0f}"


def table(df: pd.DataFrame, recipes: dict[str, str]) -> list[str]:
    """One row per method (mean ± std over its seeds), named with the recipe that made it, then the paper's rows;
    fidelity columns when present."""
    fidelity = [f for f in FIDELITY if f[0] in df and df[f[0]].notna().all()]
    head = ("| run | seeds | trainable params | " + " | ".join(m[1] for m in METRICS)
            + "".join(f" | {f[1]}" for f in fidelity) + " | train time (s) | peak memory (MB) |")
    rows = [head, "|" + " --- |" * (len(METRICS) + len(fidelity) + 5)]
    for method, group in df.groupby("method", sort=False):
        cells = [cell(group[k], d) for k, _, d in METRICS]
        cells += [fmt.format(group[k].mean()) for k, _, fmt in fidelity]
        cells += [cell(group[k], 1) if k in group else "–" for k in ("train_time_s", "peak_memory_mb")]
        n = "–" if method == "base" else str(len(group))
        name = METHODS[method] + (f" ({RECIPES[recipes[method]]})" if method in recipes else "")
        rows.append(f"| ours: {name} | {n} | {fmt_params(group['trainable_params'].iloc[0])} | "
                    + " | ".join(cells) + " |")
    for method in ("full", "lora"):
        p = PAPER[method]
        rows.append(f"| paper: GPT-2 M ({'FT' if method == 'full' else 'LoRA'}) | | {p['params']} | "
                    + " | ".join(p[k] for k, _, _ in METRICS) + " |" * len(fidelity) + " | | |")
    return rows


def summary(df: pd.DataFrame) -> dict:
    """Per method, n and each metric's mean and sample std (n - 1; none for a single run) over its seeds: Table 3
    as one row of `dvc exp show` per experiment (metrics/summary.json)."""
    out = {}
    for method, group in df.groupby("method", sort=False):
        out[method] = {"n": len(group)}
        for key, _, _ in METRICS:
            out[method][key] = {"mean": float(group[key].mean()),
                                **({"std": float(group[key].std(ddof=1))} if len(group) > 1 else {})}
    return out


def caveat(config: dict, identity: dict) -> str:
    if all(config.get(k) == v for k, v in GPT2_MEDIUM.items()):
        return (f"Base model: {identity.get('name')} at {identity.get('revision')} (GPT-2 Medium's shape). "
                "Compare with the paper's rows only if the run used the full E2E training set and the default "
                "params.yaml.")
    return (f"**Miniature run, not the paper's setting.** The base model is a {config.get('n_layer')}-layer, "
            f"{config.get('n_embd')}-wide GPT-2 ({identity.get('name')}), not GPT-2 Medium, so these numbers show "
            "the pipeline working, not a reproduction of Table 3. The paper's rows are for reference."
            + (f" The stand-in was pretrained on: {config['pretraining']}" if config.get("pretraining") else ""))


def fidelity_note(df: pd.DataFrame) -> list[str]:
    if not any(k in df for k, _, _ in FIDELITY):
        return []
    return ["MR fidelity (ours only): distinct outputs among the test MRs' outputs; share of outputs that contain "
            "their MR's name; share of all MR slot values realised, by an approximate pattern matcher "
            "(stages/lib/fidelity.py); means over seeds.", ""]


def read_curve(path: Path) -> pd.DataFrame | None:
    """A DVCLive metric file (step and value, tab-separated), if the run logged one."""
    return pd.read_csv(path, sep="\t") if path.is_file() else None


def plot_loss(live: Path, seeds: list[int], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("lora", "tab:blue"), ("full", "tab:orange")):
        for i, seed in enumerate(seeds):
            metrics = live / f"train-{method}-s{seed}" / "plots" / "metrics"
            label = f"{METHODS[method]}" if i == 0 else None
            train, evals = read_curve(metrics / "loss.tsv"), read_curve(metrics / "eval" / "loss.tsv")
            if train is not None:
                ax.plot(train["step"], train["loss"], color=color, alpha=0.8, label=label and f"{label}: train")
            if evals is not None:
                ax.plot(evals["step"], evals["loss"], "o--", color=color, label=label and f"{label}: validation")
    ax.set(xlabel="logging step", ylabel="loss (label-smoothed)", title="Training loss (every seed)")
    if ax.get_legend_handles_labels()[0]:  # no curves: no empty legend (and no matplotlib warning)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metrics(df: pd.DataFrame, path: Path) -> None:
    means = df.groupby("method", sort=False).mean(numeric_only=True)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3))
    for ax, (key, name, _) in zip(axes, METRICS):
        ax.bar(list(means.index), means[key], color=["grey", "tab:blue", "tab:orange"][:len(means)])
        ax.set_title(name + (" (%)" if key in PERCENT else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scores", required=True, help="directory with base.json and <method>-s<seed>.json")
    ap.add_argument("--costs", required=True, help="directory with train-<method>-s<seed>.json")
    ap.add_argument("--live", required=True, help="DVCLive directories train-<method>-s<seed>/ (loss curves)")
    ap.add_argument("--base", required=True, help="the base model directory (config.json, identity.json)")
    ap.add_argument("--out", required=True, help="Markdown report to write")
    ap.add_argument("--plots", required=True, help="directory for loss.png and metrics.png")
    ap.add_argument("--summary", required=True, help="metrics file: each method's mean, std and n over seeds")
    args = ap.parse_args(argv)

    cfg = config(P.read())
    seeds, protocol = cfg["seeds"], PROTOCOLS[cfg["protocol"]]
    df = runs(Path(args.scores), Path(args.costs), seeds)
    base = Path(args.base)
    model_config, identity = read_json(base / "config.json"), read_json(base / "identity.json")
    lines = ["# LoRA vs full fine-tuning on E2E (GPT-2, Hu et al. 2021 Table 3)", "",
             caveat(model_config, identity), "",
             f"Protocol: {protocol.label}.", "",
             "BLEU, METEOR and ROUGE-L in %, as the paper prints them; "
             + (f"mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
                if len(seeds) > 1 else f"one run per method (seed {seeds[0]}), so no spread")
             + f"; test set of {int(df['test_mrs'].iloc[0])} MRs.", "", *table(df, cfg["recipes"]), "",
             *fidelity_note(df), "![training loss](plots/loss.png)", "", "![metrics](plots/metrics.png)", ""]
    with exclusive(args.out), atomic_dir(args.plots) as plots:
        plot_loss(Path(args.live), seeds, plots / "loss.png")
        plot_metrics(df, plots / "metrics.png")
        with atomic_file(args.out) as f:
            f.write("\n".join(lines))
        write_json(args.summary, summary(df))
    print(f"report: {args.out}, {args.plots}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("report", main))
