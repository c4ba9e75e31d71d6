"""Specification of stages/tools/export_peft.py: our adapter as a PEFT checkpoint that computes exactly what ours does.

Invariants first (PEFT's model == our adapted model == our merged model), then the layout, then bad input.
Tiny seeded GPT-2 models on CPU; peft 0.21 loads the export.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from stages.lib import lora
from stages.tools.export_peft import CONFIG, WEIGHTS, ExportError, export
from stages.lib.gpt2 import base_identity

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft vs transformers 5

D, RANK, ALPHA, DROPOUT = 32, 4, 32.0, 0.1
TARGET_SETS = [("q", "v"), ("q", "k", "v", "o"), ("k",), ("o",), ("v", "o")]
ROOT = Path(__file__).resolve().parents[1]


def write_base(path: Path, seed: int = 0) -> Path:
    """A base model directory as the download stage writes it: config, weights, identity.json."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    (path / "identity.json").write_text(json.dumps({"name": f"tiny-{seed}", "revision": None,
                                                    "model_sha256": f"seed{seed}"}))
    return path


def write_adapter(base: Path, path: Path, targets, seed: int = 2) -> GPT2LMHeadModel:
    """Our adapter with random non-zero B (B starts at zero, which would make any export look right)."""
    model = GPT2LMHeadModel.from_pretrained(base)
    torch.manual_seed(seed)
    lora.add_lora(model, rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lora.save_adapter(model, path, base=base_identity(base))
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def base(tmp_path) -> Path:
    return write_base(tmp_path / "base")


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def load_peft(base: Path, out: Path):
    return peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), out).eval()


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_peft_loads_the_export_and_its_logits_equal_ours_and_our_merged_models(base, tmp_path, ids, targets):
    ours = write_adapter(base, tmp_path / "adapter.safetensors", targets)
    plain = logits(GPT2LMHeadModel.from_pretrained(base).eval(), ids)
    expected = logits(ours, ids)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter really changes the outputs

    diff = export(tmp_path / "adapter.safetensors", base, tmp_path / "peft")
    theirs = load_peft(base, tmp_path / "peft")
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)
    merged = lora.merge_lora(copy.deepcopy(ours))
    torch.testing.assert_close(logits(theirs, ids), logits(merged, ids), rtol=1e-5, atol=1e-5)
    assert diff is not None and diff < 1e-4  # export's own check agrees


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o")])
def test_peft_merge_gives_our_merged_weights(base, tmp_path, targets):
    # PEFT's merge must transpose for Conv1D (fan_in_fan_out): a wrong layout would show here, weight by weight.
    ours = lora.merge_lora(write_adapter(base, tmp_path / "a.safetensors", targets))
    export(tmp_path / "a.safetensors", base, tmp_path / "peft")
    theirs = load_peft(base, tmp_path / "peft").merge_and_unload()
    want, got = ours.state_dict(), theirs.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_export_is_byte_identical_when_repeated(base, tmp_path):
    write_adapter(base, tmp_path / "a.safetensors", ("q", "k", "v", "o"))
    export(tmp_path / "a.safetensors", base, tmp_path / "one", verify=False)
    export(tmp_path / "a.safetensors", base, tmp_path / "two", verify=False)
    for f in (CONFIG, WEIGHTS):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()
    text = (tmp_path / "one" / CONFIG).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------- layout


def test_q_v_become_one_rank_2r_lora_on_c_attn_with_k_rows_zero_and_alpha_doubled(base, tmp_path):
    ours = write_adapter(base, tmp_path / "a.safetensors", ("q", "v"))
    export(tmp_path / "a.safetensors", base, tmp_path / "peft", verify=False)
    config = json.loads((tmp_path / "peft" / CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2 * RANK, 2 * ALPHA, ["attn.c_attn"])
    assert config["lora_alpha"] / config["r"] == ALPHA / RANK
    assert config["lora_dropout"] == DROPOUT and config["fan_in_fan_out"] is True
    assert (config["base_model_name_or_path"], config["revision"]) == ("tiny-0", None)

    tensors = load_file(tmp_path / "peft" / WEIGHTS)
    assert len(tensors) == 2 * 2  # 2 layers x (A, B); nothing on c_proj or the MLP
    layer = ours.transformer.h[1].attn.c_attn
    a = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    assert a.shape == (2 * RANK, D) and b.shape == (3 * D, 2 * RANK)
    assert torch.equal(a, torch.cat([layer.lora_A["q"], layer.lora_A["v"]]))
    assert torch.equal(b[:D, :RANK], layer.lora_B["q"]) and torch.equal(b[2 * D:, RANK:], layer.lora_B["v"])
    assert not b[D:2 * D].any()  # k's outputs get nothing
    assert not b[:D, RANK:].any() and not b[2 * D:, :RANK].any()  # block-diagonal: q and v do not mix


def test_all_four_targets_rank_pattern_gives_c_attn_rank_3r_and_c_proj_rank_r(base, tmp_path):
    write_adapter(base, tmp_path / "a.safetensors", ("q", "k", "v", "o"))
    export(tmp_path / "a.safetensors", base, tmp_path / "peft", verify=False)
    config = json.loads((tmp_path / "peft" / CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)  # c_proj (o): as ours
    assert config["rank_pattern"] == {"attn.c_attn": 3 * RANK}
    assert config["alpha_pattern"] == {"attn.c_attn": 3 * ALPHA}
    with safe_open(tmp_path / "peft" / WEIGHTS, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("base_model.model.transformer.h.0.attn.c_proj.lora_B.weight").get_shape() == [D, RANK]


# ---------------------------------------------------------------- bad input


def test_adapter_of_another_base_is_refused_and_nothing_is_written(base, tmp_path):
    other = write_base(tmp_path / "other", seed=1)
    write_adapter(other, tmp_path / "a.safetensors", ("q", "v"))
    with pytest.raises(ExportError, match="trained on .*tiny-1"):
        export(tmp_path / "a.safetensors", base, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_file_that_is_not_our_adapter_is_refused(base, tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ExportError, match="format"):
        export(tmp_path / "x.safetensors", base, tmp_path / "peft")
    with pytest.raises(ExportError, match="no such file"):
        export(tmp_path / "missing.safetensors", base, tmp_path / "peft")


def test_an_adapter_with_non_finite_weights_is_refused_even_unverified(base, tmp_path):
    write_adapter(base, tmp_path / "a.safetensors", ("q", "v"))
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / "a.safetensors")
    tensors["transformer.h.1.attn.c_attn.lora_B.v"][3, 0] = float("inf")
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=meta)
    with pytest.raises(ExportError, match="non-finite weights .*h.1.attn.c_attn.lora_B"):
        export(tmp_path / "a.safetensors", base, tmp_path / "peft", verify=False)
    assert not (tmp_path / "peft").exists()


def test_an_existing_directory_that_is_not_an_export_is_never_replaced(base, tmp_path):
    write_adapter(base, tmp_path / "a.safetensors", ("q", "v"))
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="refusing"):
        export(tmp_path / "a.safetensors", base, tmp_path / "keep")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"


def test_cli_writes_the_export_and_bad_input_exits_2_with_one_line(base, tmp_path):
    write_adapter(base, tmp_path / "a.safetensors", ("q", "v"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "stages.tools.export_peft", "--base", str(base), "--out", str(tmp_path / "peft")]
    ok = subprocess.run(cmd + ["--adapter", str(tmp_path / "a.safetensors")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "PEFT loads it" in ok.stderr and (tmp_path / "peft" / WEIGHTS).is_file()
    bad = subprocess.run(cmd + ["--adapter", str(tmp_path / "nope.safetensors")], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"export_peft: error: --adapter: {tmp_path / 'nope.safetensors'}: "
                                               "no such file"]
