"""report: a Markdown table of the three rows beside the paper's Table 3, and plots that open offline.

The paper's numbers are printed as the paper's, never mixed with ours. When the base model is not GPT-2 Medium
(the offline demo's small stand-in) the report says so: those are miniature numbers, not a reproduction.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from stages.outputs import atomic_dir, atomic_file  # noqa: E402

METHODS = {"base": "pretrained only (no fine-tuning)", "lora": "LoRA", "full": "full fine-tuning"}
METRICS = [("bleu", "BLEU", 100), ("nist", "NIST", 1), ("meteor", "METEOR", 100), ("rouge_l", "ROUGE-L", 100),
           ("cider", "CIDEr", 1)]
# Hu et al. 2021, Table 3 (GPT-2 Medium, E2E test set). The FT row is copied there from Li & Liang (2021).
PAPER = {
    "full": {"params": "354.92M", "bleu": "68.2", "nist": "8.62", "meteor": "46.2", "rouge_l": "71.0",
             "cider": "2.47"},
    "lora": {"params": "0.35M", "bleu": "70.4±.1", "nist": "8.85±.02", "meteor": "46.8±.2", "rouge_l": "71.8±.1",
             "cider": "2.53±.02"},
}
GPT2_MEDIUM = {"n_layer": 24, "n_embd": 1024, "vocab_size": 50257}
# MR fidelity (stages/fidelity.py), shown when the score stage wrote it: (key, header, format).
FIDELITY = [("distinct_outputs", "distinct outputs", "{:d}"), ("name_realised", "name realised", "{:.0%}"),
            ("slots_realised", "slots realised", "{:.0%}")]


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def table(metrics: dict[str, dict]) -> list[str]:
    """One row per run; the fidelity columns appear when every run's metrics hold them (the paper has none)."""
    fidelity = [f for f in FIDELITY if all(f[0] in m for m in metrics.values())]
    head = ("| run | trainable params | " + " | ".join(m[1] for m in METRICS) + "".join(f" | {f[1]}" for f in fidelity)
            + " | train time (s) | peak memory (MB) |")
    rows = [head, "|" + " --- |" * (len(METRICS) + len(fidelity) + 4)]
    for method, m in metrics.items():
        cells = [f"{m[k] * scale:.2f}" if scale == 100 else f"{m[k]:.4f}" for k, _, scale in METRICS]
        cells += [fmt.format(m[k]) for k, _, fmt in fidelity]
        cost = [str(m.get("train_time_s", "–")), str(m.get("peak_memory_mb", "–"))]
        rows.append(f"| ours: {METHODS[method]} | {fmt_params(m['trainable_params'])} | " + " | ".join(cells + cost)
                    + " |")
    for method in ("full", "lora"):
        p = PAPER[method]
        rows.append(f"| paper: GPT-2 M ({'FT' if method == 'full' else 'LoRA'}) | {p['params']} | "
                    + " | ".join(p[k] for k, _, _ in METRICS) + " |" * len(fidelity) + " | | |")
    return rows


def caveat(config: dict, identity: dict) -> str:
    if all(config.get(k) == v for k, v in GPT2_MEDIUM.items()):
        return (f"Base model: {identity.get('name')} at {identity.get('revision')} (GPT-2 Medium's shape). "
                "Compare with the paper's rows only if the run used the full E2E training set and the default "
                "params.yaml.")
    return (f"**Miniature run, not the paper's setting.** The base model is a {config.get('n_layer')}-layer, "
            f"{config.get('n_embd')}-wide GPT-2 ({identity.get('name')}), not GPT-2 Medium, so these numbers show "
            "the pipeline working, not a reproduction of Table 3. The paper's rows are for reference."
            + (f" The stand-in was pretrained on: {config['pretraining']}" if config.get("pretraining") else ""))


def fidelity_note(metrics: dict[str, dict]) -> list[str]:
    if not any(k in m for m in metrics.values() for k, _, _ in FIDELITY):
        return []
    return ["MR fidelity (ours only): distinct outputs among the test MRs' outputs; share of outputs that contain "
            "their MR's name; share of all MR slot values realised, by an approximate pattern matcher "
            "(stages/fidelity.py).", ""]


def plot_loss(histories: dict[str, list], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, hist in histories.items():
        train = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
        if train:
            ax.plot(*zip(*train), label=f"{METHODS[method]}: train")
        if evals:
            ax.plot(*zip(*evals), "o--", label=f"{METHODS[method]}: validation")
    ax.set(xlabel="optimizer step", ylabel="loss (label-smoothed)", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metrics(metrics: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3))
    for ax, (key, name, scale) in zip(axes, METRICS):
        ax.bar(list(metrics), [metrics[m][key] * scale for m in metrics], color=["grey", "tab:blue", "tab:orange"])
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", required=True, help="directory with base.json, lora.json, full.json")
    ap.add_argument("--models", required=True, help="directory with base/, lora/, full/")
    ap.add_argument("--out", required=True, help="Markdown report to write")
    ap.add_argument("--plots", required=True, help="directory for loss.png and metrics.png")
    args = ap.parse_args(argv)

    metrics_dir, models = Path(args.metrics), Path(args.models)
    metrics = {m: json.loads((metrics_dir / f"{m}.json").read_text()) for m in METHODS}
    histories = {m: json.loads((models / m / "log_history.json").read_text()) for m in ("lora", "full")}
    config = json.loads((models / "base" / "config.json").read_text())
    identity = json.loads((models / "base" / "identity.json").read_text())

    lines = ["# LoRA vs full fine-tuning on E2E (GPT-2, Hu et al. 2021 Table 3)", "", caveat(config, identity), "",
             "BLEU, METEOR and ROUGE-L in %, as the paper prints them; test set of "
             f"{metrics['lora']['test_mrs']} MRs.", "", *table(metrics), "",
             *fidelity_note(metrics), "![training loss](plots/loss.png)", "", "![metrics](plots/metrics.png)", ""]
    with atomic_dir(args.plots) as plots:
        plot_loss(histories, plots / "loss.png")
        plot_metrics(metrics, plots / "metrics.png")
        with atomic_file(args.out) as f:
            f.write("\n".join(lines))
    print(f"report: {args.out}, {args.plots}/", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"report: error: {e}")
