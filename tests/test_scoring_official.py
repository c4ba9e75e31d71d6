"""Both modes of the official E2E scorer, to 4 decimals: measure_scores.py (Perl MT-Eval) and measure_scores.py -p
(pymteval), on the committed fixture cases and on real system outputs and their edited variants (those skip without
../shared). Every expected number was printed by the official scorer (tests/fixtures/scoring/PROVENANCE.md)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import stages.lib.scoring as scoring
from stages.score import load_predictions, load_refs
from stages.lib.scoring import coco, mteval
from stages.lib.scoring.ptb import coco_tokenize
from scoring_variants import variant

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "scoring"
SHARED = ROOT.parent / "shared" / "e2e"
EXPECTED = json.loads((FIX / "expected.json").read_text(encoding="utf-8"))
CASES = {k: v for k, v in EXPECTED.items() if not k.startswith("_")}
SYSTEMS = json.loads((FIX / "system-outputs-expected.json").read_text(encoding="utf-8"))
SYSTEM_CASES = {k: v for k, v in SYSTEMS.items() if not k.startswith("_")}
OTHER = ("meteor", "rouge_l", "cider")
WITH_METEOR = ("original",)  # the variants scored with all five metrics (one JVM run each)


def perl(case: dict) -> dict:
    return {k: case[k] for k in scoring.METRICS}


def load(case: dict) -> tuple[list[list[str]], list[str]]:
    return load_refs(FIX / case["references"]), load_predictions(FIX / case["predictions"])


def r4(x: float) -> float:
    return round(x, 4)


# --- the expected values themselves ----------------------------------------------------------------------------------

def test_official_modes_differ_only_in_bleu_and_nist():
    both = [(perl(c), c["python"]) for c in CASES.values() if "python" in c]
    both += [(c["perl"], c["python"]) for c in SYSTEM_CASES.values()]
    assert len(both) >= 5
    for p, py in both:
        assert {k: p[k] for k in OTHER} == {k: py[k] for k in OTHER}
    # ...and the cases are not vacuous: NIST differs between the modes somewhere (varying reference counts)
    assert any(p["nist"] != py["nist"] for p, py in both)


# --- Perl mode: BLEU and NIST (the other metrics: test_score.py's agreement test covers every case) ----------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_perl_mode_bleu_and_nist(name):
    bleu, nist = mteval.bleu_nist(*load(CASES[name]))
    assert (r4(bleu), r4(nist)) == (CASES[name]["bleu"], CASES[name]["nist"])


def test_nist_length_penalty_applies_to_short_outputs():
    # The case that the padded-document average hid: the outputs are 4 words, the references ~20.
    refs, preds = load(CASES["short-outputs"])
    bleu, nist = mteval.bleu_nist(refs, preds)
    info_only = mteval.bleu_nist(refs, [p + " " + " ".join(["zzz"] * 40) for p in preds])[1]
    assert r4(nist) == CASES["short-outputs"]["nist"] < 0.01 < info_only


# --- Python mode ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if "python" in c))
def test_python_mode_bleu_and_nist(name):
    bleu, nist = mteval.bleu_nist_python(*load(CASES[name]))
    assert (r4(bleu), r4(nist)) == (CASES[name]["python"]["bleu"], CASES[name]["python"]["nist"])


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if "python_error" in c))
def test_python_mode_fails_where_the_official_one_does(name, monkeypatch):
    # measure_scores.py -p divides NIST's 5-gram information by the outputs' 5-gram count: with outputs of at most
    # 4 words that count is 0 and it raises ZeroDivisionError. We refuse with a one-line error instead of a number.
    with pytest.raises(ZeroDivisionError, match="5-gram count"):
        mteval.bleu_nist_python(*load(CASES[name]))

    class NoJvm:
        def run(self, *a):
            return scoring.meteor.MeteorResult(0.5, [], [])

        def close(self):
            pass
    monkeypatch.setattr(scoring, "Meteor", NoJvm)
    with pytest.raises(scoring.ScoreError, match="python mode: NIST"):
        scoring.score(*load(CASES[name]), mode="python")


def test_python_tokenizer_lowercases_all_letters_and_keeps_an_empty_token():
    assert mteval.py_tokenize("") == [""]
    assert mteval.py_tokenize("ÉCOLE, 3.5 x&amp;y") == ["ÉCOLE", ",", "3.5", "x", "&", "y"]  # lowered per n-gram
    assert mteval._py_ngrams(["ÉCOLE"], 1) == {("école",): 1}
    assert mteval.tokenize("ÉCOLE") == ["École"]  # Perl mode: ASCII only


@pytest.mark.skipif(shutil.which("java") is None, reason="Java runtime not installed")
def test_cli_python_mode_prints_all_five_official_values_and_the_mode():
    case = CASES["example-inputs"]
    run = subprocess.run([sys.executable, "-m", "stages.score", "--refs", str(FIX / case["references"]),
                          "--predictions", str(FIX / case["predictions"]), "-p"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    out = json.loads(run.stdout)
    assert out.pop("mode") == "python" and out.pop("units") == "fraction"  # as the official scorer prints them
    assert {k: r4(v) for k, v in out.items()} == case["python"]
    assert list(json.loads(run.stdout)) == sorted(json.loads(run.stdout))  # sorted keys


# --- real system outputs on the E2E test set, and edited variants --------------------------------------------------

@pytest.fixture(scope="module")
def system_scores() -> dict[str, tuple[dict, tuple[float, float]]]:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} absent (developer/CI data only)")
    if shutil.which("java") is None:
        pytest.skip("Java runtime not installed")
    refs = load_refs(SHARED / SYSTEMS["_references"])

    def run(case: dict):
        lines = (SHARED / "system-outputs" / case["system"]).read_text(encoding="utf-8").splitlines()
        pred = Path(tmp) / f"{case['system']}.{case['variant']}"
        pred.write_bytes(variant(lines, case["variant"]).encode("utf-8"))
        preds = load_predictions(pred)
        if case["variant"] in WITH_METEOR:
            return scoring.score(refs, preds), mteval.bleu_nist_python(refs, preds)
        # The edits change what BLEU and NIST branch on; METEOR (one JVM run each, ~5 s) is checked on the systems as
        # they are, and on every edge case of tests/fixtures/scoring (empty lines included) in test_score.py.
        bleu, nist = mteval.bleu_nist(refs, preds)
        rouge_l, cider = coco.rouge_l_cider([[coco_tokenize(r) for r in inst] for inst in refs],
                                            [coco_tokenize(p) for p in preds])
        ours = {"bleu": bleu, "nist": nist, "rouge_l": rouge_l, "cider": cider}
        return ours, mteval.bleu_nist_python(refs, preds)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        return dict(zip(SYSTEM_CASES, pool.map(run, SYSTEM_CASES.values())))


@pytest.mark.parametrize("name", sorted(SYSTEM_CASES))
def test_system_outputs_and_variants_in_both_modes(system_scores, name):
    ours, (py_bleu, py_nist) = system_scores[name]
    expected = SYSTEM_CASES[name]
    assert {k: r4(v) for k, v in ours.items()} == {k: expected["perl"][k] for k in ours}
    assert set(ours) == set(scoring.METRICS) - ({"meteor"} if expected["variant"] not in WITH_METEOR else set())
    assert (r4(py_bleu), r4(py_nist)) == (expected["python"]["bleu"], expected["python"]["nist"])
    assert all(math.isfinite(v) for v in ours.values())
