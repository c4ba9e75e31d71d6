"""The DVC pipeline end to end, through the demo script (shrunk to seconds per stage: conftest.TINY_DEMO).

What reruns for every other key is specified with `dvc status` in tests/test_params_map.py; here the runs that need
a real `dvc exp run`: the rank change the README promises, a second seed (for the report's spread and exp show), a
bad param. The official protocol's files and scorer mode are the stages' own tests' (preprocess, score, download).
Each test that runs something works in its own copy of the one demo workspace, so they pass alone and in any order.
"""
from __future__ import annotations

import json
import re

from conftest import ROOT, run

METRICS = {"bleu", "nist", "meteor", "rouge_l", "cider", "trainable_params"}
ALL_STAGES = {"download-data", "download-model", "preprocess", "train-lora@110", "train-full@110", "generate-base",
              "generate-lora@110", "generate-full@110", "score-base", "score-lora@110", "score-full@110", "report"}


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_demo_runs_every_stage_and_reports(demo_workspace):
    ws, out = demo_workspace
    assert stages_run(out) == ALL_STAGES
    for run_name in ("base", "lora-s110", "full-s110"):
        metrics = json.loads((ws / "metrics" / "scores" / f"{run_name}.json").read_text())
        assert METRICS <= metrics.keys()
    lora = json.loads((ws / "metrics" / "scores" / "lora-s110.json").read_text())
    assert lora["mode"] == "python"  # the authors' protocol scores as they did: measure_scores.py -p
    assert lora["trainable_params"] == 1 * 2 * 2 * 4 * 32  # 1 layer x (q, v) x (A + B) x rank 4 x width 32
    assert lora["units"] == "paper"  # % as in Table 3: the report prints the file's numbers as they are
    report = (ws / "metrics" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| ours: LoRA"))
    assert [c.strip() for c in row.strip("|").split("|")][3] == f"{lora['bleu']:.2f}"
    assert "Miniature run, not the paper's setting" in report and "paper: GPT-2 M (LoRA)" in report
    assert "| ours: full fine-tuning (Li & Liang's recipe) |" in report  # each row names the recipe that made it
    summary = json.loads((ws / "metrics" / "summary.json").read_text())
    assert summary["lora"]["n"] == 1 and summary["lora"]["bleu"] == {"mean": lora["bleu"]}  # no std of one run
    assert (ws / "metrics" / "plots" / "loss.png").stat().st_size > 0
    live = json.loads((ws / "metrics" / "live" / "train-lora-s110" / "metrics.json").read_text())
    assert live["eval"]["loss"] > 0  # a run of 0.1 epochs still reports its validation loss
    assert "Demo finished" in out
    assert "No file hash info found" not in out  # DVC's first-run checkout warning, avoided by repro
    assert run(["git", "status", "--porcelain"], cwd=ws).strip() == ""  # the baseline is committed
    assert "Data and pipelines are up to date" in run(["dvc", "status"], cwd=ws)


def test_dvc_plots_show_renders_offline(demo_copy, tmp_path):
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots-page")], cwd=demo_copy)
    page = (tmp_path / "plots-page" / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in page and "vegaEmbed(" in page  # DVCLive's curves, with Vega inlined


def test_lora_knob_reruns_only_the_lora_branch(demo_copy):
    out = run(["dvc", "exp", "run", "-S", "lora.rank=8"], cwd=demo_copy)
    assert stages_run(out) == {"train-lora@110", "generate-lora@110", "score-lora@110", "report"}
    assert "No file hash info found" not in out and "loss_type" not in out  # nothing a user cannot act on
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], cwd=demo_copy))
    assert diff["metrics/scores/lora-s110.json"]["trainable_params"] == {"old": 512, "new": 1024, "diff": 512}
    assert "trainable_params" not in diff.get("metrics/scores/full-s110.json", {})


def test_a_second_seed_trains_only_its_runs_and_exp_show_reads_like_table_3(demo_copy):
    """One more seed trains only its runs; the report and the README's `dvc exp show` command then give each
    method's mean ± std and n over the seeds, one row per experiment."""
    out = run(["dvc", "exp", "run", "-S", "train.seeds=[110,111]"], cwd=demo_copy)
    assert stages_run(out) == {"train-lora@111", "train-full@111", "generate-lora@111", "generate-full@111",
                               "score-lora@111", "score-full@111", "report"}
    report = (demo_copy / "metrics" / "report.md").read_text()
    assert "over 2 seeds (110, 111)" in report
    lora_row = next(line for line in report.splitlines() if line.startswith("| ours: LoRA"))
    assert "±" in lora_row and "| 2 |" in lora_row
    summary = json.loads((demo_copy / "metrics" / "summary.json").read_text())
    assert summary["full"]["n"] == 2 and summary["full"]["bleu"]["std"] >= 0

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(dvc exp show --md [^\n]*\(mean\|std\)[^\n]*?)(?:\s+#.*)?$", readme, re.M).group(1)
    lines = [line for line in run(["bash", "-c", command], cwd=demo_copy).splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    experiment = next(line for line in lines if "[" in line)  # `└── 1a2b3c4 [name]`
    cells = dict(zip(header, (c.strip() for c in experiment.strip("|").split("|"))))
    assert cells["train.seeds"] == "[110, 111]"
    for method in ("lora", "full"):
        assert cells[f"{method}.n"] == "2"
        for metric in ("bleu", "nist", "meteor", "rouge_l", "cider"):
            assert cells[f"{method}.{metric}.mean"] not in ("", "-") and cells[f"{method}.{metric}.std"] != "-"


def test_bad_param_fails_the_stage_with_its_name_and_keeps_outputs_whole(demo_copy):
    proc = run(["dvc", "exp", "run", "-S", "lora.rank=0"], cwd=demo_copy, check=False)
    assert proc.returncode != 0
    assert "lora.rank must be >= 1, got 0" in proc.stdout + proc.stderr
    assert not list((demo_copy / "models").glob(".lora*"))  # no temporary leftovers beside the output


def test_a_duplicated_seed_stops_the_report_with_one_line_and_keeps_the_last_one(demo_copy):
    """DVC merges `[110, 110]` into one seed's runs; the report, the one stage that reads the list, refuses it by
    name, and the report it wrote last stays whole (its outputs persist): nothing is left half-written or deleted."""
    before = (demo_copy / "metrics" / "report.md").read_bytes()
    proc = run(["dvc", "exp", "run", "-S", "train.seeds=[110,110]"], cwd=demo_copy, check=False)
    assert proc.returncode != 0
    assert "report: error: train.seeds: duplicates in [110, 110]: each must appear once" in proc.stdout + proc.stderr
    assert stages_run(proc.stdout + proc.stderr) == {"report"}
    assert (demo_copy / "metrics" / "report.md").read_bytes() == before
