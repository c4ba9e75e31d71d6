"""Specification of stages/report.py: Table 3 from the score stage's files, mean ± sample std over train.seeds.

Expected cells are recomputed here with `statistics`, never copied from the report.
"""
from __future__ import annotations

import json
import statistics

import pytest
import yaml

from conftest import default_params, set_key
from stages import report
from stages.lib.cli import InputError

LORA = "ours: LoRA (the LoRA authors' recipe)"
METRICS = {"bleu": 2, "nist": 4, "meteor": 2, "rouge_l": 2, "cider": 4}  # decimals, as Table 3 prints them


def scores(bleu: float) -> dict:
    """A score-stage file in the paper's units (BLEU, METEOR, ROUGE-L in %)."""
    return {"bleu": bleu, "nist": bleu / 8, "meteor": bleu / 1.5, "rouge_l": bleu + 1, "cider": bleu / 28,
            "mode": "python", "units": "paper", "trainable_params": 4096, "test_mrs": 3,
            "distinct_outputs": 3, "name_realised": 0.5, "slots_realised": 0.25}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Two seeds per method, plus the file of a seed no longer in train.seeds."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(set_key(default_params(), "train.seeds", [1, 2])))
    bleus = {"base": 5.0, "lora-s1": 70.1, "lora-s2": 70.6, "lora-s3": 10.0, "full-s1": 68.0, "full-s2": 68.5}
    for d in ("scores", "costs", "live", "base"):
        (tmp_path / d).mkdir()
    for run, bleu in bleus.items():
        (tmp_path / "scores" / f"{run}.json").write_text(json.dumps(scores(bleu)))
        (tmp_path / "costs" / f"train-{run}.json").write_text(json.dumps({"train_time_s": 10.0,
                                                                           "peak_memory_mb": 100.0}))
    (tmp_path / "base" / "config.json").write_text(json.dumps({"n_layer": 2, "n_embd": 32}))
    (tmp_path / "base" / "identity.json").write_text(json.dumps({"name": "tiny"}))
    return tmp_path, bleus


def build(ws) -> dict[str, list[str]]:
    assert report.main(["--scores", "scores", "--costs", "costs", "--live", "live", "--base", "base",
                        "--out", "report.md", "--plots", "plots", "--summary", "summary.json"]) == 0
    rows = [line for line in (ws / "report.md").read_text().splitlines() if line.startswith("| ours")]
    return {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}


def test_cells_are_the_files_values_unscaled_with_mean_and_sample_std_over_the_seeds(workspace):
    ws, bleus = workspace
    rows = build(ws)
    lora = [scores(bleus[f"lora-s{s}"]) for s in (1, 2)]
    for i, (key, dec) in enumerate(METRICS.items()):
        values = [r[key] for r in lora]
        assert rows[LORA][3 + i] == f"{statistics.mean(values):.{dec}f} ± {statistics.stdev(values):.{dec}f}"
    assert rows["ours: pretrained only (no fine-tuning)"][3] == "5.00"  # one run: no spread
    assert rows[LORA][1] == "2"  # seeds counted; the stale lora-s3 is not among them
    assert "ours: full fine-tuning (Li & Liang's recipe)" in rows  # each row names the recipe that made it
    assert (ws / "plots" / "loss.png").is_file() and (ws / "plots" / "metrics.png").is_file()


def test_the_summary_is_table_3_as_one_row_per_experiment(workspace):
    """metrics/summary.json, what the README's `dvc exp show` selects: n, mean and sample std per method."""
    ws, bleus = workspace
    build(ws)
    summary = json.loads((ws / "summary.json").read_text())
    assert sorted(summary) == ["base", "full", "lora"]
    for method in ("lora", "full"):
        runs = [scores(bleus[f"{method}-s{s}"]) for s in (1, 2)]
        assert summary[method]["n"] == 2
        for key in METRICS:
            values = [r[key] for r in runs]
            assert summary[method][key] == pytest.approx({"mean": statistics.mean(values),
                                                          "std": statistics.stdev(values)}, rel=1e-12)
    assert summary["base"] == {"n": 1, **{k: {"mean": scores(bleus["base"])[k]} for k in METRICS}}  # no std of one


def test_a_scores_file_in_fractions_is_refused_naming_it(workspace):
    ws, _ = workspace
    frac = {**scores(0.701), "units": "fraction"}
    (ws / "scores" / "lora-s2.json").write_text(json.dumps(frac))
    with pytest.raises(InputError, match=r"scores/lora-s2.json: units 'fraction', expected 'paper'"):
        build(ws)
    assert not (ws / "report.md").exists()
