"""Specification of stages/tools/compare.py: sweep tables (paper Tables 5 and 6) from `dvc exp show --json`.

tests/fixtures/exp_show.json is real DVC 3.67.1 output from a throwaway repository whose stage wrote
metrics/lora.json (fractions without a `units` key, as stages/score.py wrote them before it named its units) from params.yaml: a baseline commit (rank 4, seed 110), a
queued rank sweep 1, 2, 8 with seeds 1 and 2, rank 4 seed 1, targets [q, k, v, o] rank 2, targets [k] rank 8, a run
that failed (rank 3; DVC still shows it with the workspace's stale metrics), one running (rank 64) and one still
queued (rank 32). exp_show_empty.json: the same repository before any experiment. Expected numbers are recomputed
here from the fixture, never copied from compare's output.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from stages.tools import compare

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TITLES = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
PERCENT = {"bleu", "meteor", "rouge_l"}
DECIMALS = {"bleu": 1, "nist": 2, "meteor": 1, "rouge_l": 1, "cider": 2}


def fixture(name="exp_show.json") -> list:
    return json.loads((FIXTURES / name).read_text())


def all_runs(show) -> list[dict]:
    """The fixture's baseline and experiments, read independently of compare: name, state, lora params, bleu..."""
    out = []
    for top in show:
        if top["rev"] == "workspace":
            continue
        revs = [(top, None)] + [(e["revs"][0], (e["executor"] or {}).get("state")) for e in top["experiments"] or []]
        for rev, state in revs:
            p = rev["data"]["params"]["params.yaml"]["data"]
            m = rev["data"]["metrics"].get("metrics/lora.json", {}).get("data")
            out.append({"name": rev["name"], "state": state, "error": rev["error"], "rank": p["lora"]["rank"],
                        "targets": ",".join(p["lora"]["targets"]), "metrics": m})
    return out


def run(capsys, show, *args) -> tuple[list[dict], str]:
    """compare's main on `show`; returns the table as dicts (header -> cell) and the whole stdout."""
    path = Path(os.environ["PYTEST_TMP"]) / "show.json"
    path.write_text(json.dumps(show))
    metrics = [] if "--metrics" in args else ["--metrics", "metrics/lora.json"]  # the fixture's layout
    compare.main(["--json", str(path), *metrics, *args])
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert all(len(c) == len(cells[0]) for c in cells)  # a well-formed Markdown table
    return [dict(zip(cells[0], c)) for c in cells[2:]], text


@pytest.fixture(autouse=True)
def tmp_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_TMP", str(tmp_path))


def fmt(values: list[float], key: str) -> str:
    scale = 100 if key in PERCENT else 1
    v = [x * scale for x in values]
    d = DECIMALS[key]
    return f"{statistics.mean(v):.{d}f}" + (f" ± {statistics.stdev(v):.{d}f}" if len(v) > 1 else "")


# ---------------------------------------------------------------- invariants


def test_rank_table_rows_are_mean_and_sample_std_of_the_finished_runs_with_that_setting(capsys):
    show = fixture()
    rows, _ = run(capsys, show, "--by", "lora.rank")
    done = [r for r in all_runs(show) if r["state"] in (None, "success") and not r["error"]]
    settings = sorted({(r["rank"], r["targets"]) for r in done})
    assert len(rows) == len(settings)
    for row in rows:
        group = [r for r in done if (str(r["rank"]), r["targets"]) == (row["lora.rank"], row["lora.targets"])]
        assert row["n"] == str(len(group)) and sorted(row["runs"].split(", ")) == sorted(r["name"] for r in group)
        for key, title in TITLES.items():
            assert row[title] == fmt([r["metrics"][key] for r in group], key), (row, title)
    assert [int(r["lora.rank"]) for r in rows] == sorted(int(r["lora.rank"]) for r in rows)  # numeric order


def test_every_run_is_either_counted_or_listed_as_not_counted(capsys):
    show = fixture()
    rows, text = run(capsys, show)
    counted = [name for row in rows for name in row["runs"].split(", ")]
    not_counted = text.split("Not counted (")[1]
    for r in all_runs(show):
        assert (r["name"] in counted) != (f" {r['name']} (" in " " + not_counted.split(": ", 1)[1]), r["name"]
    assert len(counted) == len(set(counted))


def test_failed_running_and_queued_runs_are_listed_and_their_stale_metrics_never_counted(capsys):
    show = fixture()
    states = {r["name"]: (r["state"], r["metrics"] is not None) for r in all_runs(show)}
    assert states["r3-fails"] == ("failed", True)  # the trap: DVC shows the workspace's metrics for it
    rows, text = run(capsys, show)
    assert "r3-fails (Experiment run failed)" in text
    assert "r64-running (running)" in text and "r32-queued (queued)" in text
    assert {r["lora.rank"] for r in rows}.isdisjoint({"3", "32", "64"})


def test_settings_that_differ_in_another_parameter_are_never_averaged_together(capsys):
    rows, _ = run(capsys, fixture(), "--by", "lora.rank")
    assert {(r["lora.rank"], r["lora.targets"]) for r in rows} >= {("2", "q,v"), ("2", "q,k,v,o"), ("8", "k")}
    assert "train.seeds" not in rows[0]  # seeds are what is averaged over


def test_targets_table_has_one_row_per_targets_and_rank(capsys):
    rows, _ = run(capsys, fixture(), "--by", "lora.targets")
    assert list(rows[0])[:2] == ["lora.targets", "lora.rank"]
    assert [r["lora.targets"] for r in rows] == sorted((r["lora.targets"] for r in rows),
                                                       key=lambda t: len(t.split(",")))


def in_paper_units(show) -> list:
    """The fixture as the score stage now writes it: BLEU, METEOR, ROUGE-L in %, and `units: paper`."""
    show = copy.deepcopy(show)
    for top in show:
        for rev in [top] + [e["revs"][0] for e in top.get("experiments") or []]:
            for entry in (rev.get("data") or {}).get("metrics", {}).values():
                data = (entry or {}).get("data")
                if data:
                    data.update({k: data[k] * 100 for k in PERCENT}, units="paper")
    return show


def test_a_file_in_the_papers_units_gives_the_same_table_as_one_in_fractions(capsys):
    show = fixture()
    frac, _ = run(capsys, show)
    paper, _ = run(capsys, in_paper_units(show))
    assert paper == frac
    first = [r for r in all_runs(show) if r["name"] == frac[0]["runs"].split(", ")[0]][0]
    assert first["metrics"]["bleu"] < 1 < float(frac[0]["BLEU"].split()[0])  # the fixture's fractions were scaled


def test_several_metrics_files_of_one_run_are_one_sample_each(capsys):
    # A run that scores several seeds (e.g. a DVC matrix writing metrics/lora/<seed>.json) contributes each.
    show = fixture()
    exp = show[1]["experiments"][1]["revs"][0]
    m = exp["data"]["metrics"]
    m["metrics/lora/1.json"] = copy.deepcopy(m.pop("metrics/lora.json"))
    m["metrics/lora/2.json"] = copy.deepcopy(m["metrics/lora/1.json"])
    m["metrics/lora/2.json"]["data"]["bleu"] += 0.01
    p = exp["data"]["params"]["params.yaml"]["data"]["lora"]
    p["rank"], p["targets"] = 16, ["q", "v"]
    rows, _ = run(capsys, show, "--metrics", "metrics/lora/*.json")
    row = [r for r in rows if r["lora.rank"] == "16"][0]
    assert row["n"] == "2" and row["runs"] == f"{exp['name']}:metrics/lora/1.json, {exp['name']}:metrics/lora/2.json"
    b = m["metrics/lora/1.json"]["data"]["bleu"]
    assert row["BLEU"] == fmt([b, b + 0.01], "bleu")


def test_the_same_run_shown_twice_counts_once_and_says_so(capsys):
    show = fixture()
    dup = copy.deepcopy(show[1]["experiments"][1])
    dup["revs"][0]["name"] = dup["name"] = "again"
    show[1]["experiments"].append(dup)
    rows, text = run(capsys, show)
    assert "again" not in [n for r in rows for n in r["runs"].split(", ")]
    assert f"again (same params and metrics as {show[1]['experiments'][1]['name']})" in text


# ---------------------------------------------------------------- edge cases and bad input


def test_a_repository_without_experiments_gives_the_baseline_row(capsys):
    rows, text = run(capsys, fixture("exp_show_empty.json"))
    assert [(r["lora.rank"], r["n"], r["runs"]) for r in rows] == [("4", "1", "master")]
    assert "Not counted" not in text


def test_no_finished_run_with_the_metrics_is_an_error_naming_the_file(capsys):
    with pytest.raises(compare.CompareError, match=r"no finished experiment has metrics/full\.json"):
        run(capsys, fixture(), "--metrics", "metrics/full.json")


def test_a_run_missing_a_metric_is_listed(capsys):
    show = fixture()
    exp = show[1]["experiments"][1]
    del exp["revs"][0]["data"]["metrics"]["metrics/lora.json"]["data"]["cider"]
    _, text = run(capsys, show)
    assert f"{exp['name']} (metrics/lora.json: no cider)" in text


def test_unknown_by_key_is_an_error_that_suggests_the_right_one(capsys):
    with pytest.raises(compare.CompareError, match=r"--by: .*'lora\.rnak'.*did you mean lora\.rank\?"):
        run(capsys, fixture(), "--by", "lora.rnak")


def test_non_finite_metric_fails_loudly(capsys):
    show = fixture()
    show[1]["data"]["metrics"]["metrics/lora.json"]["data"]["nist"] = float("nan")
    with pytest.raises(compare.CompareError, match="master: metrics/lora.json: nist = nan"):
        run(capsys, show)


def test_percentages_in_a_file_without_units_are_an_error(capsys):
    show = fixture()
    show[1]["data"]["metrics"]["metrics/lora.json"]["data"]["bleu"] = 70.4
    with pytest.raises(compare.CompareError, match=r"master: metrics/lora.json: bleu = 70.4 is not a fraction"):
        run(capsys, show)
    only = fixture("exp_show_empty.json")
    only[1]["data"]["metrics"]["metrics/lora.json"]["data"].update(bleu=70.4, units="paper")
    rows, _ = run(capsys, only)  # a file that says so is not scaled
    assert rows[0]["BLEU"] == "70.4"
    only[1]["data"]["metrics"]["metrics/lora.json"]["data"]["units"] = "percent"
    with pytest.raises(compare.CompareError, match=r"units = 'percent', expected 'fraction' or 'paper'"):
        run(capsys, only)


def test_plot_is_written_and_identical_when_repeated(capsys, tmp_path):
    run(capsys, fixture(), "--plot", str(tmp_path / "a.png"))
    run(capsys, fixture(), "--plot", str(tmp_path / "b.png"))
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_cli_runs_dvc_exp_show_and_reports_its_failure_in_one_line(tmp_path):
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n[ \"$*\" = 'exp show --json' ] || exit 3\n"
                    f"[ -n \"$FAIL\" ] && {{ printf 'ERROR: not a DVC repository\\n\\nHaving any troubles? Hit us up\\n' >&2; exit 1; }}\n"
                    f"cat {FIXTURES / 'exp_show.json'}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "stages.tools.compare", "--metrics", "metrics/lora.json"],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("| lora.rank |"), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "stages.tools.compare"], capture_output=True, text=True,
                         env={**env, "FAIL": "1"})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["compare: error: dvc exp show --json failed (exit 1): "
                                       "ERROR: not a DVC repository"]
