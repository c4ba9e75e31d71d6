"""Specification of stages/lib/lora.py: LoRA on GPT-2's W_q and W_v (Hu et al. 2021, section 4.2, Table 11).

Invariants first (what makes the adapter trustworthy), then the API around it. Tiny random GPT-2 models on CPU.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
from transformers.pytorch_utils import Conv1D

from stages.lib.lora import (LoRAConv1D, add_lora, count_trainable, load_adapter, lora_config, lora_state_dict,
                         merge_lora, save_adapter)

ROOT = Path(__file__).resolve().parents[1]
D, LAYERS, RANK = 32, 2, 4
TARGET_SETS = [("q", "v"), ("k",), ("o",), ("q", "k", "v", "o")]
BLOCK = {"q": 0, "k": 1, "v": 2}  # column block of c_attn's (d, 3d) weight: [q | k | v]


def tiny_config(**kw) -> GPT2Config:
    # All base dropouts off, so that the only randomness in train mode is LoRA's own dropout.
    return GPT2Config(n_layer=LAYERS, n_embd=D, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


@pytest.fixture
def base() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_config()).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize_b(model, seed=2, std=0.5):
    """B starts at zero; give it values so that the update is visible (A is already Kaiming-random)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def rank(delta: torch.Tensor) -> int:
    # A merged delta is read back from fp32 weights: singular values past r are rounding noise (~1e-8 relative
    # here, against >0.1 for the r real ones), hence rtol=1e-5 rather than float64's default tolerance.
    return int(torch.linalg.matrix_rank(delta, rtol=1e-5))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_with_b_zero_the_adapted_model_is_exactly_the_base(base, ids, targets):
    adapted = add_lora(copy.deepcopy(base), rank=RANK, alpha=32, targets=targets)
    assert torch.equal(logits(adapted, ids), logits(base, ids))


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_merged_and_unmerged_logits_agree(base, ids, targets):
    adapted = randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=32, targets=targets))
    unmerged = logits(adapted, ids)
    assert not torch.allclose(unmerged, logits(base, ids), atol=1e-3)  # the update is really there
    merged = merge_lora(adapted)
    torch.testing.assert_close(logits(merged, ids), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_merge_changes_only_targeted_blocks_by_rank_at_most_r(base, targets):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merge_lora(randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=32, targets=targets)))
    after = merged.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        delta = (after[key] - before[key]).double()
        if key.endswith("attn.c_attn.weight"):
            for t, i in BLOCK.items():
                block = delta[:, i * D:(i + 1) * D]
                if t in targets:
                    assert 0 < rank(block) <= RANK, (key, t)
                else:
                    assert torch.equal(after[key][:, i * D:(i + 1) * D], before[key][:, i * D:(i + 1) * D]), (key, t)
        elif key.endswith("attn.c_proj.weight") and "o" in targets:
            assert 0 < rank(delta) <= RANK, key
        else:  # biases, MLP, layer norms, embeddings, untargeted projections: bit-identical
            assert torch.equal(after[key], before[key]), key


def test_untargeted_k_block_of_c_attn_output_is_untouched_before_merge(base):
    adapted = randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=32))
    layer = adapted.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        y, y0 = layer(x), layer.base(x)
    assert torch.equal(y[..., D:2 * D], y0[..., D:2 * D])
    assert not torch.allclose(y[..., :D], y0[..., :D]) and not torch.allclose(y[..., 2 * D:], y0[..., 2 * D:])


def test_update_is_alpha_over_r_times_b_a_and_doubling_alpha_doubles_it(base):
    one = randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=8))
    two = add_lora(copy.deepcopy(base), rank=RANK, alpha=16)
    two.load_state_dict(lora_state_dict(one), strict=False)
    layer = one.transformer.h[1].attn.c_attn
    expected_q = 8 / RANK * layer.lora_A["q"].T @ layer.lora_B["q"].T  # (d_in, d) in Conv1D's x @ W layout
    w0 = base.transformer.h[1].attn.c_attn.weight
    d1 = merge_lora(one).transformer.h[1].attn.c_attn.weight - w0
    d2 = merge_lora(two).transformer.h[1].attn.c_attn.weight - w0
    torch.testing.assert_close(d1[:, :D], expected_q.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-4, atol=1e-6)


def test_dropout_acts_in_train_mode_only(base, ids):
    adapted = randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=32, dropout=0.5))
    no_dropout = add_lora(copy.deepcopy(base), rank=RANK, alpha=32, dropout=0.0)
    no_dropout.load_state_dict(lora_state_dict(adapted), strict=False)
    adapted.train()
    torch.manual_seed(3)
    assert not torch.equal(logits(adapted, ids), logits(adapted, ids))
    adapted.eval()
    assert torch.equal(logits(adapted, ids), logits(adapted, ids))
    assert torch.equal(logits(adapted, ids), logits(no_dropout.eval(), ids))


def test_dropout_only_touches_the_lora_path(base, ids):
    adapted = add_lora(copy.deepcopy(base), rank=RANK, alpha=32, dropout=0.5).train()  # B = 0
    assert torch.equal(logits(adapted, ids), logits(base, ids))


def test_eval_and_train_never_merge(base, ids):
    adapted = randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=32))
    w = adapted.transformer.h[0].attn.c_attn.base.weight.clone()
    out = logits(adapted, ids)
    for _ in range(2):
        adapted.eval()
        adapted.train()
    adapted.eval()
    assert isinstance(adapted.transformer.h[0].attn.c_attn, LoRAConv1D)
    assert torch.equal(adapted.transformer.h[0].attn.c_attn.base.weight, w)
    assert torch.equal(logits(adapted, ids), out)


def test_only_lora_tensors_are_trainable_and_get_gradients(base, ids):
    adapted = add_lora(copy.deepcopy(base), rank=RANK, alpha=32).train()
    adapted(ids, labels=ids).loss.backward()
    for name, p in adapted.named_parameters():
        if "lora" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B = 0 at the start, so only B gets a non-zero gradient on the first step (A's is B-weighted)
    assert any(p.grad.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)


# ---------------------------------------------------------------- counting


def test_gpt2_medium_with_r4_on_q_and_v_has_393216_trainable_parameters():
    # GPT-2 Medium's shape, hard-coded (the hub config is not available offline): 24 layers, d = 1024, 16 heads.
    # Built on the meta device: shapes only, no 1.4 GB allocation.
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024))
        add_lora(model, rank=4, alpha=32)
    assert count_trainable(model) == 24 * 2 * (4 * 1024 + 1024 * 4) == 393_216


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_count_is_layers_times_targets_times_2rd(base, targets):
    adapted = add_lora(copy.deepcopy(base), rank=RANK, alpha=32, targets=targets)
    assert count_trainable(adapted) == LAYERS * len(targets) * 2 * RANK * D


# ---------------------------------------------------------------- merge gives a plain GPT-2


def test_merge_restores_the_original_conv1d_and_round_trips_save_pretrained(base, ids, tmp_path):
    adapted = randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=32, targets=("q", "v", "o")))
    original = adapted.transformer.h[0].attn.c_attn.base
    out = logits(adapted, ids)
    merged = merge_lora(adapted)
    assert merged is adapted  # in place
    assert merged.transformer.h[0].attn.c_attn is original and type(original) is Conv1D
    assert not any(isinstance(m, LoRAConv1D) for m in merged.modules())
    assert not any("lora" in k for k in merged.state_dict())
    merged.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), logits(merged, ids))
    torch.testing.assert_close(logits(reloaded, ids), out, rtol=1e-5, atol=1e-5)


def test_merge_without_lora_is_an_error(base):
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(base)


# ---------------------------------------------------------------- adapter state and files


def test_lora_state_dict_is_keyed_as_the_model_and_restores_with_strict_false(base, ids):
    adapted = randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=32))
    sd = lora_state_dict(adapted)
    assert len(sd) == LAYERS * 2 * 2 and all("lora" in k for k in sd)
    assert sd.keys() <= adapted.state_dict().keys()
    fresh = add_lora(copy.deepcopy(base), rank=RANK, alpha=32)
    result = fresh.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == [] and not any("lora" in k for k in result.missing_keys)
    assert torch.equal(logits(fresh, ids), logits(adapted, ids))


def test_adapter_file_round_trip_onto_a_fresh_base(base, ids, tmp_path):
    adapted = randomize_b(add_lora(copy.deepcopy(base), rank=RANK, alpha=32, dropout=0.1, targets=("q", "v")))
    save_adapter(adapted, tmp_path / "a.safetensors", base="tiny-gpt2@seed0")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors", base="tiny-gpt2@seed0").eval()
    assert lora_config(fresh) == {"rank": RANK, "alpha": 32.0, "dropout": 0.1, "targets": ("q", "v")}
    assert torch.equal(logits(fresh, ids), logits(adapted.eval(), ids))
    # onto a model that already has a matching LoRA, without a base check
    again = load_adapter(add_lora(copy.deepcopy(base), rank=RANK, alpha=32), tmp_path / "a.safetensors").eval()
    assert torch.equal(logits(again, ids), logits(adapted, ids))


@pytest.mark.parametrize("field, kw, theirs, ours", [
    ("rank", dict(rank=8, alpha=32), "4", "8"),
    ("alpha", dict(rank=RANK, alpha=16), "32.0", "16.0"),
    ("targets", dict(rank=RANK, alpha=32, targets=("q", "k", "v")), "('q', 'v')", "('q', 'k', 'v')"),
])
def test_adapter_settings_mismatch_is_a_clear_error(base, tmp_path, field, kw, theirs, ours):
    save_adapter(add_lora(copy.deepcopy(base), rank=RANK, alpha=32), tmp_path / "a.safetensors", base="b")
    with pytest.raises(ValueError, match=rf"^{field}: .*{re.escape(theirs)}.*{re.escape(ours)}"):
        load_adapter(add_lora(copy.deepcopy(base), **kw), tmp_path / "a.safetensors")


def test_adapter_base_identity_mismatch_is_a_clear_error(base, tmp_path):
    save_adapter(add_lora(copy.deepcopy(base), rank=RANK, alpha=32), tmp_path / "a.safetensors", base="gpt2-medium")
    with pytest.raises(ValueError, match=r"^base: .*'gpt2-medium'.*'gpt2-large'"):
        load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors", base="gpt2-large")


def test_adapter_with_missing_or_unexpected_tensors_is_an_error(base, tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(add_lora(copy.deepcopy(base), rank=RANK, alpha=32), path, base="b")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="missing"):
        load_adapter(copy.deepcopy(base), path)
    save_file({**tensors, "transformer.h.0.attn.c_attn.lora_A.k": tensors[dropped].clone()}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(copy.deepcopy(base), path)


def test_adapter_file_is_safetensors_with_settings_metadata(base, tmp_path):
    path = tmp_path / "a.safetensors"
    adapted = add_lora(copy.deepcopy(base), rank=RANK, alpha=32, dropout=0.1)
    save_adapter(adapted, path, base="gpt2-medium")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert list(meta) == ["lora_e2e"]  # one key: safetensors writes several in a random order
    settings = json.loads(meta["lora_e2e"])
    assert {k: settings[k] for k in ("rank", "alpha", "dropout", "targets", "base", "format_version")} == {
        "rank": "4", "alpha": "32.0", "dropout": "0.1", "targets": "q,v", "base": "gpt2-medium",
        "format_version": "2"}
    assert load_file(str(path)).keys() == lora_state_dict(adapted).keys()


def test_adapter_file_bytes_are_identical_across_processes(base, tmp_path):
    """DVC hashes models/lora: the same weights must give the same bytes, in any process (metadata order)."""
    path = tmp_path / "a.safetensors"
    save_adapter(add_lora(copy.deepcopy(base), rank=RANK, alpha=32, targets=("q", "k", "v", "o")), path, base="b")
    code = ("import sys, torch; from transformers import GPT2LMHeadModel; from stages.lib import lora; "
            "from tests.test_lora import tiny_config; m = GPT2LMHeadModel(tiny_config()); "
            "lora.load_adapter(m, sys.argv[1]); lora.save_adapter(m, sys.argv[2], base='b')")
    out = tmp_path / "again.safetensors"  # safetensors orders a metadata map anew in each process: one more is enough
    subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True, cwd=ROOT)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- arguments and models


@pytest.mark.parametrize("kw, error, name", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-1), ValueError, "rank"),
    (dict(rank=4.0), TypeError, "rank"),
    (dict(rank=True), TypeError, "rank"),
    (dict(alpha=0), ValueError, "alpha"),
    (dict(alpha=-32), ValueError, "alpha"),
    (dict(alpha=math.nan), ValueError, "alpha"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(targets=()), ValueError, "targets"),
    (dict(targets=("q", "x")), ValueError, "targets"),
    (dict(targets=("q", "q")), ValueError, "targets"),
    (dict(targets="qv"), TypeError, "targets"),
    (dict(targets=None), TypeError, "targets"),
])
def test_invalid_arguments_raise_errors_naming_the_argument(base, kw, error, name):
    args = {"rank": RANK, "alpha": 32, **kw}
    with pytest.raises(error, match=rf"^{name}:"):
        add_lora(base, **args)
    assert not any(isinstance(m, LoRAConv1D) for m in base.modules())  # nothing half-done


def test_a_model_that_is_not_gpt2_is_refused():
    with pytest.raises(TypeError, match="^model:"):
        add_lora(torch.nn.Linear(4, 4), rank=RANK, alpha=32)


def test_a_gpt2_with_foreign_attention_projections_is_refused_untouched(base):
    base.transformer.h[1].attn.c_attn = torch.nn.Linear(D, 3 * D)
    with pytest.raises(TypeError, match="^model:"):
        add_lora(base, rank=RANK, alpha=32)
    assert all(p.requires_grad for p in base.parameters())
    assert not any(isinstance(m, LoRAConv1D) for m in base.modules())


def test_lora_added_twice_is_refused(base):
    add_lora(base, rank=RANK, alpha=32)
    with pytest.raises(ValueError, match="^model: LoRA is already added"):
        add_lora(base, rank=RANK, alpha=32)


def test_a_bare_gpt2model_is_accepted_too():
    torch.manual_seed(0)
    model = add_lora(GPT2Model(tiny_config()), rank=RANK, alpha=32)
    assert count_trainable(model) == LAYERS * 2 * 2 * RANK * D
    assert model(torch.zeros(1, 3, dtype=torch.long)).last_hidden_state.shape == (1, 3, D)
