"""train and generate on a tiny GPT-2: what is learned, what is saved, how decoding batches, bad params."""
from __future__ import annotations

import hashlib
import json
import math
import re

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TOKENIZER
from stages import generate, preprocess, train
from stages.lib import gpt2, lora
from stages.lib.params import ParamError

TINY = dict(vocab_size=50257, n_positions=128, n_embd=16, n_layer=1, n_head=2)


@pytest.fixture
def base_dir(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(**TINY)).save_pretrained(d)
    (d / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    (d / "identity.json").write_text(json.dumps({"name": "tiny", "revision": None, "model_sha256": "0" * 64}))
    return d


def test_a_loaded_base_computes_the_causal_lm_loss_without_a_loss_type_notice(base_dir, caplog):
    """transformers' "`loss_type=None` ... unrecognized" notice is one no user can act on: it is silenced at its
    source by naming the loss transformers falls back to, so the number is the same."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.modeling_utils").warning_once.cache_clear()  # it says so once per process
    model = gpt2.load_model(base_dir)
    ids = torch.tensor([[464, 3290, 318, 257, 50256]])
    loss = model(ids, labels=ids).loss
    logits = model(ids).logits
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])  # next-token loss, written out
    assert torch.allclose(loss, plain)
    assert not [r for r in caplog.records if "loss_type" in r.getMessage()]


@pytest.fixture
def prepared(params_file, raw_dir, base_dir, tmp_path):
    out = tmp_path / "prepared"
    params_file(preprocess__max_length=TINY["n_positions"])
    preprocess.main(["--raw", str(raw_dir), "--base", str(base_dir), "--out", str(out)])
    return out


def fast_params(params_file, **more):
    fast = {f"{recipe}__{key}": value for recipe in ("authors", "li_liang") for key, value in (
        ("train__epochs", 1), ("train__warmup_steps", 0), ("generate__num_beams", 2), ("generate__max_new_tokens", 6))}
    return params_file(**fast, preprocess__max_length=TINY["n_positions"], **more)


def run_train(method, prepared, base_dir, out, costs=None):
    costs = costs or out.parent / f"costs-{out.name}.json"
    return train.main(["--method", method, "--seed", "110", "--data", str(prepared), "--base", str(base_dir), "--out", str(out),
                       "--costs", str(costs), "--live", str(out.parent / f"live-{out.name}")])


def digests(out):
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_saves_weights_info_and_loss_history(params_file, prepared, base_dir, tmp_path, method):
    fast_params(params_file)
    out = tmp_path / method
    run_train(method, prepared, base_dir, out)
    info = json.loads((out / "train_info.json").read_text())
    n_layer, d = TINY["n_layer"], TINY["n_embd"]
    # full fine-tuning follows Li & Liang's recipe by default: every weight, and their [PAD] row (d more)
    expected = n_layer * 2 * 2 * 4 * d if method == "lora" else sum(
        p.numel() for p in GPT2LMHeadModel.from_pretrained(base_dir).parameters()) + d
    assert info["trainable_params"] == expected
    assert info["recipe"] == {"lora": "authors", "full": "li_liang"}[method]
    assert info["steps"] > 0 and info["device"] == "cpu"
    costs = json.loads((tmp_path / f"costs-{method}.json").read_text())
    assert costs["train_time_s"] >= 0 and costs["peak_memory_mb"] > 0 and costs["train_tokens_per_s"] > 0
    weights = sum(p.numel() * 4 for p in GPT2LMHeadModel.from_pretrained(base_dir).parameters()) / 2**20
    # Weights, gradients and AdamW's two moments: full fine-tuning holds ~4x the weights, LoRA barely more than 1x.
    expected = 4 * weights if method == "full" else weights
    assert expected <= costs["training_state_mb"] <= expected * 1.02
    history = json.loads((out / "log_history.json").read_text())
    assert any("loss" in h for h in history)
    assert not [k for h in history for k in h if k.endswith(("_runtime", "_per_second"))]  # timings: in costs
    live = tmp_path / f"live-{method}"
    summary = json.loads((live / "metrics.json").read_text())  # what `dvc exp show` lists
    assert math.isfinite(summary["eval"]["loss"]) and "tokens_per_s" not in json.dumps(summary)  # a timing: in costs
    curve = (live / "plots" / "metrics" / "loss.tsv").read_text().splitlines()  # per-log training loss
    assert curve[0].split("\t") == ["step", "loss"] and len(curve) >= 3  # a curve, not a point
    assert not (live / "params.yaml").exists()  # params.yaml of the project is the only configuration
    saved = {p.name for p in out.iterdir()}
    assert ("adapter.safetensors" in saved) == (method == "lora") and ("model.safetensors" in saved) == (method == "full")


def test_lora_training_moves_only_the_adapter(params_file, prepared, base_dir, tmp_path, monkeypatch):
    """After a real LoRA run (weight decay on), every base weight of the trained model equals the base file's and
    only A and B moved: the model is caught as train saves it, before anything is merged or reloaded."""
    fast_params(params_file, lora__lr=0.05, lora__weight_decay=0.1)
    trained = {}
    save = lora.save_adapter
    monkeypatch.setattr(lora, "save_adapter", lambda model, *a, **k: trained.update(
        {n: v.detach().clone() for n, v in model.state_dict().items()}) or save(model, *a, **k))
    run_train("lora", prepared, base_dir, tmp_path / "lora")
    base = GPT2LMHeadModel.from_pretrained(base_dir).state_dict()
    frozen = {n: v for n, v in trained.items() if "lora_" not in n}
    assert len(frozen) == len(base) and {n.replace(".base.", ".") for n in frozen} == set(base)
    for name, value in frozen.items():
        assert torch.equal(value, base[name.replace(".base.", ".")]), name
    assert all(v.abs().sum() > 0 for n, v in trained.items() if "lora_B" in n)  # B left zero: it trained


@pytest.mark.parametrize("key, value", [
    ("lora.rank", 0), ("lora.rank", 2.5), ("lora.targets", ["q", "x"]), ("lora.targets", []), ("lora.lr", -1e-4),
    ("lora.dropout", 1.0), ("train.epochs", 0), ("train.batch_size", 0), ("train.label_smoothing", 1.0),
])
def test_bad_training_params_fail_before_loading_anything(params_file, tmp_path, key, value):
    params_file(**{key.replace(".", "__"): value})
    with pytest.raises(ParamError, match=key):
        run_train("lora", tmp_path / "nowhere", tmp_path / "none", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("search", ["authors", "transformers"])
def test_batched_decoding_equals_one_by_one(base_dir, tmp_path, search):
    """Left padding must not change outputs: position ids follow the attention mask."""
    tok = gpt2.load_tokenizer(TOKENIZER)
    model = GPT2LMHeadModel.from_pretrained(base_dir)
    mrs = ["name[Aromi]", "name[The Eagle], food[French], area[riverside]", "name[Zizzi], priceRange[cheap]"]
    contexts = preprocess.encode_contexts(tok, mrs, "paper")
    cfg = dict(num_beams=3, length_penalty=0.9, no_repeat_ngram_size=4, max_new_tokens=8, batch_size=3,
               early_stopping=True, search=search, eos_ids=[50256, 628], banned_ids=[])
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    batched = generate.generate(model, contexts, cfg, decode)
    single = generate.generate(model, contexts, {**cfg, "batch_size": 1}, decode)
    assert batched == single and len(batched) == 3


def test_ngram_ban_covers_the_output_not_the_mr():
    """gpt2_beam.py bans repeated 4-grams of the generated text; a 4-gram of the MR may still be generated."""
    prompt = [1, 2, 3, 4, 9]
    ban = generate.NoRepeatNGramInOutput(4, prompt_len=len(prompt))
    scores = torch.zeros(1, 10)
    assert torch.isfinite(ban(torch.tensor([prompt + [1, 2, 3]]), scores)).all()  # 1 2 3 4 is in the MR: allowed
    banned = ban(torch.tensor([prompt + [5, 6, 7, 8, 5, 6, 7]]), scores)  # 5 6 7 8 already generated
    assert torch.isinf(banned[0, 8]) and torch.isfinite(banned[0, :8]).all()


def test_one_line_keeps_the_scorer_format():
    assert generate.one_line(" The Eagle\nis  cheap.\r\n") == "The Eagle is cheap."


def test_generate_stage_writes_one_line_per_test_mr_and_info(params_file, prepared, base_dir, tmp_path):
    fast_params(params_file)
    out = tmp_path / "pred" / "base.txt"
    generate.main(["--method", "base", "--data", str(prepared), "--base", str(base_dir), "--model", str(base_dir),
                   "--out", str(out), "--costs", str(tmp_path / "costs.json")])
    n_mrs = len(datasets.load_from_disk(str(prepared / "paper" / "test")))
    assert len(out.read_text(encoding="utf-8").split("\n")) == n_mrs + 1  # n lines, each newline-terminated
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["trainable_params"] == 0 and info["test_mrs"] == n_mrs  # no timings: they go to the costs file
    assert 1 <= info["distinct_outputs"] <= n_mrs and 0 <= info["name_realised"] <= 1  # MR fidelity
    assert json.loads((tmp_path / "costs.json").read_text())["outputs_per_s"] > 0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_twice_gives_byte_identical_tracked_outputs(params_file, prepared, base_dir, tmp_path, method):
    """DVC hashes models/<method>: identical inputs must give identical bytes, or every rerun invalidates
    generate, score and report and stores a duplicate in the cache."""
    fast_params(params_file)
    run_train(method, prepared, base_dir, tmp_path / "a" / method)
    run_train(method, prepared, base_dir, tmp_path / "b" / method)
    first = digests(tmp_path / "a" / method)
    assert len(first) >= 3 and digests(tmp_path / "b" / method) == first


@pytest.mark.parametrize("value", ["sometimes", 1])
def test_early_stopping_accepts_only_true_false_never(params_file, value):
    with pytest.raises(ParamError, match="generate.early_stopping"):
        generate.read_config(params_file(authors__generate__early_stopping=value))


# ---------------------------------------------------------------- the authors' settings reach the model


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gpt2_dropout_param_reaches_every_dropout_of_the_base(params_file, base_dir, dropout):
    cfg = train.read_config(params_file(li_liang__train__gpt2_dropout=dropout), "full")
    model = train.build_model(base_dir, "full", cfg)
    probs = {m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert probs == {dropout}  # embedding, attention and residual dropouts alike


def test_gpt2_dropout_leaves_loras_own_dropout_alone(params_file, base_dir):
    cfg = train.read_config(params_file(authors__train__gpt2_dropout=0.0, lora__dropout=0.1), "lora")
    model = train.build_model(base_dir, "lora", cfg)
    probs = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    ours = {name: p for name, p in probs.items() if "c_attn.dropout" in name}  # LoRAConv1D's input dropout
    assert set(ours.values()) == {0.1} and {p for name, p in probs.items() if name not in ours} == {0.0}


@pytest.mark.parametrize("eps", [1e-6, 1e-8])
def test_adam_epsilon_param_reaches_the_optimizer(params_file, base_dir, tmp_path, eps):
    from transformers import Trainer
    cfg = train.read_config(params_file(li_liang__train__adam_epsilon=eps, li_liang__train__optimizer="torch"), "full")
    model = train.build_model(base_dir, "full", cfg)
    trainer = Trainer(model=model, args=train.training_args(cfg, str(tmp_path), log_every=1), eval_dataset=[{}])
    optimizer = trainer.create_optimizer()
    assert optimizer.defaults["eps"] == eps and optimizer.defaults["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("sampler", ["authors", "random"])
def test_the_recipes_sampler_reaches_the_trainer(params_file, base_dir, tmp_path, sampler):
    from stages.lib.optim import AuthorsSampler
    cfg = train.read_config(params_file(authors__train__sampler=sampler), "lora")
    data = [{"input_ids": [1, 2, 3], "n_context": 1}] * 5
    trainer = train.E2ETrainer(model=train.build_model(base_dir, "lora", cfg), train_dataset=data, eval_dataset=data,
                               args=train.training_args(cfg, str(tmp_path), log_every=1),
                               optimizer_name=cfg["optimizer"], sampler_name=cfg["sampler"])
    assert isinstance(trainer._get_train_sampler(), AuthorsSampler) is (sampler == "authors")


def test_the_authors_order_and_length_grouping_cannot_both_be_asked_for(params_file):
    with pytest.raises(ParamError, match="speed.group_by_length and authors.train.sampler=authors"):
        train.read_config(params_file(speed__group_by_length=True), "lora")


@pytest.mark.parametrize("search", ["authors", "transformers"])
def test_generate_search_param_picks_the_decoder(params_file, monkeypatch, search):
    """generate.search reaches the decoder: the authors' search (stages/lib/beam.py) or transformers' generate()."""
    cfg = generate.read_config(params_file(authors__generate__search=search))
    called = []
    monkeypatch.setattr(generate.beam, "authors_beam_search", lambda *a, **k: called.append("authors") or [[1]])
    monkeypatch.setattr(generate, "transformers_search", lambda *a, **k: called.append("transformers") or ["x"])
    generate.generate(torch.nn.Linear(1, 1), [[1, 2]], cfg, lambda ids: "x")
    assert called == [search]


def test_eos_ids_reach_the_authors_search(params_file, monkeypatch):
    cfg = generate.read_config(params_file(authors__generate__eos_ids=[50256, 628]))
    seen = {}
    monkeypatch.setattr(generate.beam, "authors_beam_search", lambda *a, **k: seen.update(k) or [[1]])
    generate.generate(torch.nn.Linear(1, 1), [[1, 2]], cfg, lambda ids: "x")
    assert seen["eos_ids"] == [50256, 628] and seen["num_beams"] == cfg["num_beams"]


def test_authors_outputs_are_cut_like_gpt2_decode(params_file, monkeypatch):
    """gpt2_decode.py keeps the text before <|endoftext|> and before a blank line, stripped."""
    cfg = generate.read_config(params_file())
    monkeypatch.setattr(generate.beam, "authors_beam_search", lambda *a, **k: [[1]])
    out = generate.generate(torch.nn.Linear(1, 1), [[1]], cfg, lambda ids: " The Eagle is cheap .\n\nmore<|endoftext|>")
    assert out == ["The Eagle is cheap ."]


@pytest.mark.parametrize("value", [[], [50256, 50256], "50256", [-1], [True]])
def test_bad_eos_ids_name_the_param(params_file, value):
    with pytest.raises(ParamError, match="generate.eos_ids"):
        generate.read_config(params_file(authors__generate__eos_ids=value))


# ---------------------------------------------------------------- a method's own recipe (Li & Liang's FT row)


def test_full_train_overrides_reach_only_full_training(params_file):
    params = params_file(full__train={"batch_size": 12, "warmup_steps": 3, "label_smoothing": 0.2})
    full, lora_cfg = train.read_config(params, "full"), train.read_config(params, "lora")
    assert (full["batch_size"], full["warmup_steps"], full["label_smoothing"]) == (12, 3, 0.2)
    assert (lora_cfg["batch_size"], lora_cfg["warmup_steps"]) == (params["authors"]["train"]["batch_size"],
                                                                  params["authors"]["train"]["warmup_steps"])


def test_full_generate_overrides_reach_only_full_decoding(params_file):
    params = params_file(full__generate={"search": "transformers", "num_beams": 7, "banned_ids": [198]})
    full = generate.read_config(params, "full")
    assert (full["search"], full["num_beams"], full["banned_ids"]) == ("transformers", 7, [198])
    for method in ("base", "lora"):
        assert generate.read_config(params, method)["num_beams"] == params["authors"]["generate"]["num_beams"]


@pytest.mark.parametrize("key, value, message", [
    ("full__train", {"seeds": [1]}, "unknown parameter full.train.seeds"),
    ("full__train", [1], "full.train must be a mapping"),
    ("full__train", {"batch_size": 0}, "full.train.batch_size must be >= 1, got 0"),
    ("full__generate", {"beams": 5}, "unknown parameter full.generate.beams"),
    ("lora__generate", {"banned_ids": [198]}, "lora.generate: banned_ids needs search: transformers or li-liang"),
    ("full__generate", {"eos_ids": [50256, 628]}, "full.generate: search li-liang stops at one eos id"),
])
def test_bad_overrides_name_the_key(params_file, key, value, message):
    params = params_file(**{key: value})
    method = key.split("__")[0]
    with pytest.raises(ParamError, match=re.escape(message)):
        train.read_config(params, method) if "train" in key else generate.read_config(params, method)


def test_a_ban_needs_a_search_that_bans(params_file):
    with pytest.raises(ParamError, match="authors.generate: banned_ids needs search: transformers or li-liang"):
        generate.read_config(params_file(authors__generate__banned_ids=[198]))


def test_banned_tokens_never_appear_in_transformers_search(base_dir):
    model = GPT2LMHeadModel.from_pretrained(base_dir)
    allowed = {11, 13, 262, 50256}
    cfg = dict(num_beams=3, length_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=6, batch_size=2,
               early_stopping=True, search="transformers", eos_ids=[50256],
               banned_ids=[i for i in range(TINY["vocab_size"]) if i not in allowed])
    out = generate.generate(model, [[1, 2, 3], [4, 5]], cfg, lambda ids: " ".join(map(str, ids)))
    assert all(set(map(int, o.split())) <= allowed for o in out)


def test_generation_progress_reports_elapsed_time_and_eta(base_dir, capsys):
    model = GPT2LMHeadModel.from_pretrained(base_dir)
    cfg = dict(num_beams=2, length_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=3, batch_size=1,
               early_stopping=True, search="transformers", eos_ids=[50256], banned_ids=[])
    generate.generate(model, [[1, 2], [3, 4]], cfg, lambda ids: "x")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generate: ")]
    assert [line.split(",")[0] for line in lines] == ["generate: 1/2 outputs", "generate: 2/2 outputs"]
    seconds = [float(line.split(", ")[1].rstrip(" s")) for line in lines]
    assert all(0 <= s < 600 for s in seconds)  # seconds since decoding began, not since some other clock


def test_generating_twice_gives_byte_identical_predictions_and_info(params_file, prepared, base_dir, tmp_path):
    """DVC hashes data/predictions/: a rerun on the same model must not change a byte (timings go to costs)."""
    fast_params(params_file)
    for name in ("a", "b"):
        generate.main(["--method", "base", "--data", str(prepared), "--base", str(base_dir), "--model",
                       str(base_dir), "--out", str(tmp_path / name / "base.txt"), "--costs", str(tmp_path / f"{name}.json")])
    assert digests(tmp_path / "a") == digests(tmp_path / "b") and len(digests(tmp_path / "a")) == 2


def test_a_full_disk_leaves_neither_prediction_file(params_file, prepared, base_dir, tmp_path, monkeypatch, capsys):
    """The predictions and their info are written together: a failure on the second removes the first."""
    import errno
    from stages.lib import cli

    fast_params(params_file)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(generate.json, "dump", full_disk)
    out = tmp_path / "pred" / "base.txt"
    status = cli.run("generate", generate.main, ["--method", "base", "--data", str(prepared), "--base", str(base_dir),
                                                 "--model", str(base_dir), "--out", str(out), "--costs",
                                                 str(tmp_path / "costs.json")])
    err = capsys.readouterr().err
    assert status == 2 and "cannot write base.txt and base.json (No space left on device)" in err
    assert sorted(p.name for p in out.parent.iterdir()) == []
