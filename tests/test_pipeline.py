"""The DVC pipeline end to end, through the demo script, shrunk to seconds per stage.

Specifies what `dvc exp run -S` must rerun: a LoRA knob reruns exactly the LoRA branch and the report; a
preprocess knob reruns preprocess and everything after it, never download.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METRICS = {"bleu", "nist", "meteor", "rouge_l", "cider", "trainable_params"}
TINY = {
    # A 1-layer, 32-wide GPT-2 (still the real 50,257-token vocabulary), a fraction of an epoch, short beams; two
    # copy steps and no copy gate (one layer cannot copy: tests/test_tiny_base.py covers the gate).
    "DEMO_BASE_ARGS": "--layers 1 --width 32 --heads 2 --epochs 0.2 --copy-steps 2 --min-copy-accuracy 0",
    "DEMO_OVERRIDES": "train.epochs=0.1 train.warmup_steps=0 generate.num_beams=2 generate.max_new_tokens=8",
}


def run(cmd, cwd, **env):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **env}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    ws = tmp_path_factory.mktemp("pipeline") / "demo"
    out = run(["bash", str(ROOT / "scripts" / "demo.sh"), str(ws)], cwd=ROOT, **TINY)
    return ws, out


def test_demo_runs_every_stage_and_reports(demo):
    ws, out = demo
    assert stages_run(out) == {"download", "preprocess", "train@lora-110", "train@full-110", "generate-base",
                               "generate@lora-110", "generate@full-110", "score-base", "score@lora-110",
                               "score@full-110", "report"}
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
    assert (ws / "metrics" / "plots" / "loss.png").stat().st_size > 0
    run(["dvc", "plots", "show", "-o", str(ws.parent / "plots-page")], cwd=ws)
    page = (ws.parent / "plots-page" / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in page and "vegaEmbed(" in page  # DVCLive's curves, with Vega inlined
    assert "Demo finished" in out
    assert "No file hash info found" not in out  # DVC's first-run checkout warning, avoided by repro
    assert run(["git", "status", "--porcelain"], cwd=ws).strip() == ""  # the baseline is committed


def test_lora_knob_reruns_only_the_lora_branch(demo):
    ws, _ = demo
    out = run(["dvc", "exp", "run", "-S", "lora.rank=8"], cwd=ws)
    assert stages_run(out) == {"train@lora-110", "generate@lora-110", "score@lora-110", "report"}
    assert "No file hash info found" not in out and "loss_type" not in out  # nothing a user cannot act on
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], cwd=ws))
    assert diff["metrics/scores/lora-s110.json"]["trainable_params"] == {"old": 512, "new": 1024, "diff": 512}
    full = diff.get("metrics/scores/full-s110.json", {})
    assert "trainable_params" not in full


def test_a_second_seed_trains_only_its_runs_and_the_report_shows_a_spread(demo):
    ws, _ = demo
    out = run(["dvc", "exp", "run", "-S", "train.seeds=[110,111]"], cwd=ws)
    assert stages_run(out) == {"train@lora-111", "train@full-111", "generate@lora-111", "generate@full-111",
                               "score@lora-111", "score@full-111", "report"}
    report = (ws / "metrics" / "report.md").read_text()
    assert "over 2 seeds (110, 111)" in report
    lora_row = next(line for line in report.splitlines() if line.startswith("| ours: LoRA"))
    assert "±" in lora_row and "| 2 |" in lora_row


def test_preprocess_knob_reruns_everything_but_download(demo):
    ws, _ = demo
    out = run(["dvc", "exp", "run", "-S", "preprocess.format=equals"], cwd=ws)
    assert stages_run(out) == {"preprocess", "train@lora-110", "train@full-110", "train@lora-111", "train@full-111",
                               "generate-base", "generate@lora-110", "generate@full-110", "generate@lora-111",
                               "generate@full-111", "score-base", "score@lora-110", "score@full-110",
                               "score@lora-111", "score@full-111", "report"}


def test_two_processes_rerun_only_training_and_what_follows(demo):
    """One knob for several processes (GPUs): the pipeline's definition does not change, only what it trains."""
    ws, _ = demo
    out = run(["dvc", "exp", "run", "-S", "train.processes=2"], cwd=ws)
    must = {"train@lora-110", "train@full-110", "train@lora-111", "train@full-111",
            "generate@lora-110", "generate@full-110", "generate@lora-111", "generate@full-111", "report"}
    # A score reruns only if its predictions changed: the tiny model's 8-token outputs can come out byte-identical
    # (seen for both full runs with the copy-phase base), and DVC then rightly skips their score.
    may = {"score@lora-110", "score@full-110", "score@lora-111", "score@full-111"}
    assert must <= stages_run(out) <= must | may
    assert out.count("trainable parameters") == 4  # each training stage reports once (rank 0), not per rank


def test_the_official_e2e_protocol_runs_end_to_end_on_its_csvs(demo):
    """protocol=e2e: the sample's CSVs and the official scorer's Perl mode; every stage reads the switch, directly
    (download, preprocess, score) or through its inputs."""
    ws, _ = demo
    out = run(["dvc", "exp", "run", "-S", "protocol=e2e"], cwd=ws)
    assert {"download", "preprocess", "score-base", "report"} <= stages_run(out)
    assert sorted(p.name for p in (ws / "data" / "raw").iterdir()) == ["dev.csv", "test.csv", "train.csv"]
    scores = json.loads((ws / "metrics" / "scores" / "base.json").read_text())
    assert scores["mode"] == "perl" and "official E2E protocol" in (ws / "metrics" / "report.md").read_text()


def test_bad_param_fails_the_stage_with_its_name_and_keeps_outputs_whole(demo):
    ws, _ = demo
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(["dvc", "exp", "run", "-S", "lora.rank=0"], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "lora.rank must be >= 1, got 0" in proc.stdout + proc.stderr
    assert not list((ws / "models").glob(".lora.*"))  # no temporary leftovers beside the output
