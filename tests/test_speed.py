"""stages/lib/speed.py: params.yaml's `speed:` and `runtime:` sections, their device rules, and what they hand to
transformers and torch."""
from __future__ import annotations

import pytest
import torch

from conftest import default_params
from stages.lib import params as P
from stages.lib import decoding, speed

RUNTIME = ("dataloader_workers", "pin_memory")  # the runtime keys speed.resolve reads; the rest are speed's


def params_with(**overrides) -> dict:
    params = default_params()
    for key, value in overrides.items():
        params["runtime" if key in RUNTIME else "speed"][key] = value
    return params


def read_config(params: dict):
    p = P.validate(params)
    return p.speed, p.runtime


def resolve(cfg, device, capability=None):
    return speed.resolve(*cfg, device, capability=capability)


# --- invariants -------------------------------------------------------------------------------------------------

def test_defaults_are_the_authors_protocol_on_any_device():
    cfg = read_config(params_with())
    for device, cap in (("cpu", None), ("cuda", (9, 0)), ("cuda", (6, 0))):
        kw = speed.training_kwargs(resolve(cfg, device, capability=cap))
        assert kw["bf16"] is False and kw["tf32"] is False and kw["torch_compile"] is False
        assert kw["train_sampling_strategy"] == "random"
        assert kw["dataloader_num_workers"] == 0
        assert kw["dataloader_pin_memory"] is (device == "cuda")  # auto: pinned exactly with CUDA


def test_tf32_is_always_explicit_so_compile_cannot_switch_it_on():
    cfg = read_config(params_with(compile=True))
    kw = speed.training_kwargs(resolve(cfg, "cuda", capability=(9, 0)))
    assert kw["torch_compile"] is True and kw["tf32"] is False  # not None: None + compile means TF32 on


@pytest.mark.parametrize("key,value,expect", [
    ("precision", "bf16", {"bf16": True, "tf32": False}),
    ("precision", "tf32", {"bf16": False, "tf32": True}),
    ("compile", True, {"torch_compile": True}),
    ("dataloader_workers", 3, {"dataloader_num_workers": 3}),
    ("pin_memory", False, {"dataloader_pin_memory": False}),
    ("group_by_length", True, {"train_sampling_strategy": "group_by_length"}),
])
def test_each_option_changes_only_its_own_kwargs(key, value, expect):
    base = speed.training_kwargs(resolve(read_config(params_with()), "cuda", capability=(9, 0)))
    kw = speed.training_kwargs(resolve(read_config(params_with(**{key: value})), "cuda",
                                             capability=(9, 0)))
    assert {k: v for k, v in kw.items() if base[k] != v} == {k: v for k, v in expect.items() if base[k] != v}
    assert {k: kw[k] for k in expect} == expect


# --- validation: errors name the key ----------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("precision", "fp16"), ("precision", "FP32"), ("precision", None),
    ("compile", "yes"), ("compile", 1),
    ("dataloader_workers", -1), ("dataloader_workers", 1.5), ("dataloader_workers", True),
    ("pin_memory", "on"), ("pin_memory", 0),
    ("group_by_length", "false"), ("group_by_length", 0),
])
def test_bad_values_name_the_key(key, value):
    section = "runtime" if key in RUNTIME else "speed"
    with pytest.raises(P.ParamError, match=rf"{section}\.{key}\b"):
        read_config(params_with(**{key: value}))


def test_missing_key_and_unknown_key_are_named():
    p = params_with()
    del p["speed"]["group_by_length"]
    with pytest.raises(P.ParamError, match=r"speed\.group_by_length"):
        read_config(p)
    with pytest.raises(P.ParamError, match=r"speed\.precison"):
        read_config(params_with(precison="bf16"))
    p = params_with()
    del p["speed"]
    with pytest.raises(P.ParamError, match=r"\bspeed\b"):
        read_config(p)
    with pytest.raises(P.ParamError, match=r"\bspeed\b"):
        read_config({**params_with(), "speed": "fast"})


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_reduced_precision_is_refused_on_cpu_and_pre_ampere_gpus(precision):
    cfg = read_config(params_with(precision=precision))
    with pytest.raises(P.ParamError, match=rf"speed\.precision={precision}.*CPU"):
        resolve(cfg, "cpu")
    with pytest.raises(P.ParamError, match=r"speed\.precision.*7\.0"):
        resolve(cfg, "cuda", capability=(7, 0))
    assert resolve(cfg, "cuda", capability=(8, 0))["precision"] == precision


def test_pinned_memory_without_cuda_is_refused_auto_is_not():
    with pytest.raises(P.ParamError, match=r"runtime\.pin_memory"):
        resolve(read_config(params_with(pin_memory=True)), "cpu")
    assert resolve(read_config(params_with()), "cpu")["pin_memory"] is False


# --- what transformers and torch make of it ---------------------------------------------------------------------

def test_kwargs_are_accepted_by_this_transformers_version(tmp_path):
    from transformers import TrainingArguments

    cfg = read_config(params_with(group_by_length=True, dataloader_workers=2))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none",
                             **speed.training_kwargs(resolve(cfg, "cpu")))
    assert args.train_sampling_strategy == "group_by_length" and args.dataloader_num_workers == 2
    assert args.bf16 is False and args.tf32 is False


def test_group_by_length_groups_our_list_datasets_by_input_ids(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    data = [{"input_ids": [1] * n, "n_context": 1} for n in (5, 40, 7, 33, 12, 3, 25, 9)]
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=64))
    for grouped in (True, False):
        kw = speed.training_kwargs(resolve(read_config(params_with(group_by_length=grouped)), "cpu"))
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2, **kw)
        sampler = Trainer(model=model, args=args, train_dataset=data)._get_train_sampler()
        assert isinstance(sampler, LengthGroupedSampler) is grouped
        if grouped:
            assert sampler.lengths == [len(d["input_ids"]) for d in data]


def test_precision_context_sets_and_restores_matmul_precision():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision)
    with speed.precision_context("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    with speed.precision_context("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    with pytest.raises(RuntimeError), speed.precision_context("tf32", "cpu"):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.fp32_precision == "tf32"
        assert (a @ b).dtype == torch.float32  # TF32 is a matmul mode, not a dtype
        raise RuntimeError("restored even on error")
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision) == before
    with pytest.raises(ValueError, match="precision"), speed.precision_context("fp16", "cpu"):
        pass


def test_compile_for_generation_only_when_asked():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=64))
    original = model.forward
    assert speed.compile_for_generation(model, False).forward == original
    compiled = speed.compile_for_generation(model, True)
    assert compiled is model and model.forward != original and callable(model.forward)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_ban_equals_transformers(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(n)
    for length in range(0, 14):
        ids = torch.randint(0, 6, (12, length), generator=g)  # a 6-token alphabet: many repeats
        scores = torch.randn(12, 9, generator=g)
        expected = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
        got = decoding.ban_repeated_ngrams(ids, scores.clone(), n)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), (n, length)
        assert torch.equal(got[~torch.isinf(got)], scores[~torch.isinf(got)])
    assert torch.isinf(decoding.ban_repeated_ngrams(torch.tensor([[1, 2, 3, 1, 2]]), torch.zeros(1, 5), 3)).tolist() \
        == [[False, False, False, True, False]]  # "1 2" was followed by 3: 3 is banned, nothing else
