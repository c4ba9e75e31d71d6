"""benchmarks/bench_gpu.py: the shrunk mode runs end to end on a CPU and writes a complete, finite, sorted JSON;
its projection is the protocol's arithmetic on the measured rates; the decoder is pluggable."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = load_bench()


def no_nan(text: str):
    def refuse(c):
        raise AssertionError(f"non-finite number {c} in the JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--shrink", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    text = out.read_text()
    return no_nan(text), text, proc.stdout


def numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


# --- the shrunk run ---------------------------------------------------------------------------------------------

def test_shrunk_run_writes_sorted_finite_json_without_errors(shrunk):
    r, text, stdout = shrunk
    assert text == json.dumps(r, indent=2, sort_keys=True) + "\n"  # sorted keys, as every project JSON
    assert all(math.isfinite(x) for x in numbers(r))
    assert r["mode"] == "shrunk" and r["errors"] == {}
    assert r["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "projected full protocol, default" in stdout  # the short table


def test_default_fidelity_configs_are_always_measured(shrunk):
    r = shrunk[0]
    for name in ("lora/fp32", "full/fp32", "peft/fp32"):
        t = r["train"][name]
        assert t["steps"] >= 3 and t["steps_per_s"] > 0 and t["tokens_per_s"] > 0 and t["eval_steps_per_s"] > 0
        assert t["padded_tokens_per_s"] >= t["tokens_per_s"] and 0 <= t["padding_fraction"] < 1
        assert t["peak_memory_mib"] > 0 and t["state_mib"] > 0 and math.isfinite(t["mean_loss"])
        assert math.isclose(t["steps_per_s"], t["steps"] / t["seconds"])
    tr = r["train"]
    # ours (q, v: 2 x (r d + d r) per layer) and PEFT (whole c_attn: r (d + 3d)) train the same number of weights
    d, layers = r["shape"]["n_embd"], r["shape"]["n_layer"]
    assert tr["lora/fp32"]["trainable_params"] == tr["peft/fp32"]["trainable_params"] == layers * 16 * d
    assert tr["full/fp32"]["trainable_params"] > 100 * tr["lora/fp32"]["trainable_params"]
    assert tr["full/fp32"]["state_mib"] > tr["lora/fp32"]["state_mib"]  # gradients + AdamW state of every weight
    dec = next(iter(r["decode"].values()))
    assert 1 <= dec["contexts_measured"] <= dec["contexts"] and dec["outputs_per_s"] > 0
    assert math.isclose(dec["projected_630_s"], 630 * dec["seconds"] / dec["contexts_measured"])
    assert r["peft_tokens_per_s_ratio"]["fp32"] == pytest.approx(
        tr["lora/fp32"]["tokens_per_s"] / tr["peft/fp32"]["tokens_per_s"])


def test_lengths_come_from_the_shipped_e2e_sample_in_paper_format(shrunk):
    stats = shrunk[0]["data"]
    assert stats["example_tokens"]["n"] == 1932 and stats["context_tokens"]["n"] == 230  # all sample rows / MRs
    assert stats["context_tokens"]["mean"] < stats["example_tokens"]["mean"] <= stats["example_tokens"]["max"]


def test_options_this_device_cannot_run_are_listed_with_a_reason(shrunk):
    r = shrunk[0]
    if torch.cuda.is_available():
        pytest.skip("on CUDA these options run")
    skipped = r["skipped"]
    assert "speed.precision=bf16" in skipped["train:lora/bf16"]
    assert "runtime.pin_memory" in skipped["train:lora/fp32+pin=True"]
    assert "compile" in skipped["train:lora/fp32+compile"]
    assert all(isinstance(v, str) and v for v in skipped.values())
    measured = {f"train:{k}" for k in r["train"]} | {f"decode:{k}" for k in r["decode"]}
    assert not set(skipped) & measured


def test_projection_is_the_protocol_arithmetic(shrunk):
    r = shrunk[0]
    proj = r["projection"]
    for kind in ("default", "same_numbers", "best"):
        p = proj[kind]
        assert p["total_s"] == pytest.approx(sum(p["parts_s"].values()))
        for method in ("lora", "full"):
            t = r["train"][p["configs"][f"train_{method}"]]
            assert t["method"] == method
            assert p["parts_s"][f"train_{method}"] == pytest.approx(
                5 * 5258 / t["steps_per_s"] + t["warmup_s"] + 5 * 584 / t["eval_steps_per_s"])
        assert p["parts_s"]["decode_base_lora_full"] == pytest.approx(
            3 * r["decode"][p["configs"]["decode"]]["projected_630_s"])
    assert proj["best"]["total_s"] <= proj["same_numbers"]["total_s"] <= proj["default"]["total_s"]
    assert proj["default"]["configs"] == {"train_lora": "lora/fp32", "train_full": "full/fp32", "decode": "fp32/bs2"}


def test_decoding_times_full_length_beams(shrunk):
    """The random model must not stop at once (EOS suppressed): every beam runs (nearly) all 64 tokens."""
    assert shrunk[0]["decode"] and all(d["mean_output_tokens"] > 48 for d in shrunk[0]["decode"].values())


# --- pure pieces, fast ------------------------------------------------------------------------------------------

def test_projection_picks_the_fastest_allowed_config():
    def t(method, sps, **kw):
        return {"method": method, "steps_per_s": sps, "warmup_s": 1.0, "eval_steps_per_s": 100.0,
                "precision": "fp32", "compile": False, **kw}
    train = {"lora/fp32": t("lora", 10.0), "lora/bf16": t("lora", 20.0, precision="bf16"),
             "full/fp32": t("full", 5.0), "broken": {"error": "x", "method": "full"}}
    decode = {"fp32/bs16": {"precision": "fp32", "compile": False, "projected_630_s": 60.0},
              "bf16/bs16": {"precision": "bf16", "compile": False, "projected_630_s": 30.0}}
    fp32 = bench.project(train, decode, lambda r: r["precision"] == "fp32")
    assert fp32["configs"] == {"train_lora": "lora/fp32", "train_full": "full/fp32", "decode": "fp32/bs16"}
    assert fp32["parts_s"]["train_lora"] == pytest.approx(26290 / 10 + 1 + 2920 / 100)
    assert fp32["parts_s"]["decode_base_lora_full"] == 180.0
    assert fp32["parts_s"]["score_cpu_constant"] == pytest.approx(20.72 + 2 * 6.22)
    best = bench.project(train, decode, lambda r: True)
    assert best["configs"]["train_lora"] == "lora/bf16" and best["configs"]["decode"] == "bf16/bs16"
    assert "missing" in bench.project(train, decode, lambda r: r["precision"] == "tf32")


@pytest.mark.parametrize("method", ["full", "peft", "lora"])
def test_bf16_autocast_step_runs_on_cpu(method):
    """The bf16 path is refused for the pipeline on CPU but must not rot: the same step under CPU autocast."""
    tok = bench.load_tokenizer(ROOT / "data" / "gpt2" / "tokenizer.json")
    examples = bench.e2e_data(tok)[0][:8]
    r = bench.measure_train(method, {**bench.DEFAULT, "precision": "bf16"}, bench.SHAPES["shrunk"], examples,
                            "cpu", batch=2, warmup=1, steps=1, max_s=0.0, eval_steps=1)
    assert r["precision"] == "bf16" and math.isfinite(r["mean_loss"]) and r["steps"] == 1


def test_decoder_is_pluggable_and_gets_the_paper_settings():
    calls = []

    def fake(model, contexts, cfg, decode):
        calls.append((len(contexts), dict(cfg)))
        return ["x"] * len(contexts)

    r = bench.measure_decode(fake, None, bench.SHAPES["shrunk"], [[1, 2]] * 5, "cpu", "fp32", False,
                             batch_size=2, max_s=60, warm=1)
    assert r["contexts_measured"] == 5 and r["empty_outputs"] == 0
    assert [n for n, _ in calls] == [1, 2, 2, 1]  # one warm-up context, then batches in order
    cfg = calls[0][1]
    assert {k: cfg[k] for k in ("num_beams", "length_penalty", "no_repeat_ngram_size", "max_new_tokens")} == {
        "num_beams": 10, "length_penalty": 0.9, "no_repeat_ngram_size": 4, "max_new_tokens": 64}
