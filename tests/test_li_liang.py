"""The paper's FT row as Li & Liang ran it (the li_liang recipe, full fine-tuning's default): every setting pinned
to their code (XiangLi1999/PrefixTuning 6519d30; `tf/` their transformers 3.2 fork), and each reaching the run.

Their search and the authors' AdamW are pinned against plain references in test_li_liang_beam.py and test_optim.py.
"""
from __future__ import annotations

import json
import os

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import SAMPLE, TOKENIZER, default_params, make_workspace, set_key
from stages import generate, train
from stages.lib import gpt2, li_liang, li_liang_beam, optim
from stages.lib import params as P
from stages.lib.gpt2 import EOS, collate

LINE = "name : Blue Spice | Type : coffee shop | area : city centre||A coffee shop in the city centre area called " \
       "Blue Spice . "  # a line of the authors' (and Li & Liang's) train.txt, with its trailing space


@pytest.fixture(scope="module")
def tok():
    return gpt2.load_tokenizer(TOKENIZER)


# --- the recipe's settings, as their code has them ----------------------------------------------------------------

def test_full_fine_tuning_follows_their_recipe_by_default():
    p = P.validate(default_params())
    assert p.full.recipe == "li_liang" and p.lora.recipe == "authors"
    assert (p.full.lr, p.full.weight_decay) == (5e-5, 0.0)  # train_e2e.py lines 49-50
    assert P.loop(p, "full").model_dump() == {
        "epochs": 5,  # train_e2e.py line 44
        "batch_size": 10,  # line 42, one GPU
        "warmup_steps": 0,  # tf/training_args.py line 218: --warmup_steps is passed only for low-data runs
        "label_smoothing": 0.0,  # tf/modeling_gpt2.py lines 1042-1048: plain cross-entropy
        "max_grad_norm": 1.0,  # tf/training_args.py line 211, applied at tf/trainer.py lines 793-794
        "adam_epsilon": 1e-8,  # tf/training_args.py lines 208-210
        "gpt2_dropout": 0.1,  # the hub config's, on under model.train(); `--use_custom_teacher_dropout 'no'` is truthy
        "optimizer": "authors",  # tf/optimization.py lines 219-318: eps outside the bias correction, decay after
        "sampler": "random",  # tf/trainer.py lines 325-357: RandomSampler, drop_last False: a short last batch
    }
    assert P.decode(p, "full").model_dump() == {
        "search": "li-liang", "num_beams": 5, "max_new_tokens": 100, "length_penalty": 1.0,  # run_generation.py
        "no_repeat_ngram_size": 0, "early_stopping": False, "eos_ids": [50256],  # lines 1231-1245, config defaults
        "banned_ids": [198, 628],  # bad_words_ids [[628], [198]]: "\n\n" and "\n" only
    }
    assert P.recipe(p, "full").layout == "li-liang" and P.recipe(p, "full").pad_token is True
    assert {k: v for k, v in li_liang_beam.RUN_GENERATION.items() if k != "banned_ids"} == {
        "num_beams": 5, "max_new_tokens": 100, "length_penalty": 1.0, "eos_id": 50256, "early_stopping": False}
    assert sorted(li_liang_beam.RUN_GENERATION["banned_ids"]) == P.decode(p, "full").banned_ids


def test_a_methods_own_keys_come_last_and_the_other_method_keeps_its_recipe():
    params = set_key(default_params(), "full.train", {"epochs": 2})
    params = set_key(params, "full.generate", {"num_beams": 3})
    p = P.validate(params)
    assert P.loop(p, "full").epochs == 2 and P.loop(p, "full").batch_size == 10  # over li_liang's, not instead
    assert P.decode(p, "full").num_beams == 3 and P.decode(p, "full").search == "li-liang"
    assert P.loop(p, "lora").epochs == 5 and P.decode(p, "lora").num_beams == 10  # the authors' recipe untouched
    assert P.decode(p, "base") == p.authors.generate  # the pretrained base is decoded as the authors decode


def test_full_fine_tuning_under_the_authors_recipe_is_loras_loop_with_its_own_lr():
    p = P.validate(set_key(default_params(), "full.recipe", "authors"))
    assert P.loop(p, "full") == P.loop(p, "lora") and P.decode(p, "full") == P.decode(p, "lora")
    cfg = train.read_config(p, "full")
    assert (cfg["lr"], cfg["layout"], cfg["pad_token"]) == (5e-5, "paper", False)


# --- their layout and [PAD] ---------------------------------------------------------------------------------------

def test_their_layout_keeps_the_trailing_space_and_learns_it(tok):
    mr, ref = LINE.split("||")
    ex = li_liang.encode(tok, [(mr, ref)])
    ids, c = ex["input_ids"][0], ex["n_context"][0]
    # ' {} {} '.format(src, bos) + tgt + ' {}'.format(eos), tokenized with <|endoftext|> as one token
    assert ids == tok.encode(f" {mr} ") + [EOS] + tok.encode(f" {ref} ") + [EOS]
    assert ids[c - 2:c] == [220, EOS] and ids[-4:] == [764, 220, 220, EOS]  # " ." then the two spaces, then EOS
    labels = collate([{"input_ids": ids, "n_context": c}])["labels"][0].tolist()
    assert labels[:c] == [-100] * c and labels[c:] == ids[c:]  # up to and including the first EOS: not learned
    assert li_liang.encode_prompts(tok, [mr])[0] == ids[:c]  # the prompt is the training context


def test_their_reader_keeps_what_the_authors_reader_strips(tmp_path):
    from stages.lib.authors_data import read_authors_file
    path = tmp_path / "train.txt"
    path.write_text(LINE + "\n" + (SAMPLE / "train.txt").read_text().splitlines()[0] + "\n")
    stripped = read_authors_file(path)
    rows = li_liang.read_rows(path, len(stripped))
    assert rows[0] == tuple(LINE.split("||")) and rows[0][1].endswith(". ") and stripped[0][1].endswith(".")
    with pytest.raises(ValueError, match="train.txt"):
        li_liang.read_rows(path, len(stripped) + 1)


def test_their_pad_row_is_one_more_token_from_n_0_002_the_same_every_time():
    models = []
    for _ in range(2):
        m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=256, n_head=2, n_positions=32))
        li_liang.add_pad_row(m)
        models.append(m)
    row = models[0].get_input_embeddings().weight[li_liang.PAD].detach()
    assert models[0].config.vocab_size == 50258 and torch.equal(row, models[1].get_input_embeddings().weight[50257])
    assert models[0].lm_head.weight.data_ptr() == models[0].get_input_embeddings().weight.data_ptr()  # tied
    assert abs(float(row.std()) - 0.02) < 0.004 and abs(float(row.mean())) < 0.004


# --- what reaches a run -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("li-liang"), {
        "li_liang.train.epochs": 1, "li_liang.generate.max_new_tokens": 6, "li_liang.generate.num_beams": 2,
        "full.lr": 0.01})


@pytest.fixture(scope="module")
def full_run(ws):
    """A full fine-tuning run under the default recipe (Li & Liang's), with what the Trainer was handed."""
    seen, original, cwd = {}, train.E2ETrainer.create_optimizer, os.getcwd()

    def spy(self, model=None):
        out = original(self, model)
        seen.update(optimizer=self.optimizer, args=self.args, data=self.train_dataset)
        return out
    train.E2ETrainer.create_optimizer = spy
    os.chdir(ws)
    try:
        assert train.main(["--method", "full", "--seed", "110", "--data", "data/prepared", "--base", "models/base",
                           "--out", "models/full", "--costs", "costs.json", "--live", "live"]) == 0
    finally:
        train.E2ETrainer.create_optimizer = original
        os.chdir(cwd)
    return seen


def test_a_full_run_trains_on_their_layout_with_their_loop(ws, full_run):
    opt, args = full_run["optimizer"], full_run["args"]
    assert isinstance(opt, optim.AuthorsAdamW) and opt.defaults["eps"] == 1e-8 and opt.defaults["betas"] == (0.9, 0.999)
    assert opt.defaults["weight_decay"] == 0.0 and opt.defaults["correct_bias"] is True
    assert (args.max_grad_norm, args.warmup_steps, args.label_smoothing_factor, args.per_device_train_batch_size) == \
        (1.0, 0, 0.0, 10)
    layout = datasets.load_from_disk(str(ws / "data/prepared/li-liang/train"))
    assert full_run["data"][0]["input_ids"] == layout[0]["input_ids"]
    model = gpt2.load_model(ws / "models/full")
    assert model.config.vocab_size == 50258 and model.config.resid_pdrop == 0.1  # their [PAD], their dropout
    assert json.loads((ws / "models/full/train_info.json").read_text())["recipe"] == "li_liang"


def test_a_full_run_is_decoded_with_their_search_and_text(ws, full_run, monkeypatch):
    monkeypatch.chdir(ws)
    calls = []
    search = li_liang_beam.li_liang_beam_search
    monkeypatch.setattr(li_liang_beam, "li_liang_beam_search", lambda *a, **k: calls.append(k) or search(*a, **k))
    assert generate.main(["--method", "full", "--data", "data/prepared", "--base", "models/base", "--model",
                          "models/full", "--out", "pred/full.txt", "--costs", "costs-gen.json"]) == 0
    assert calls and calls[0]["banned_ids"] == [198, 628] and calls[0]["eos_id"] == EOS
    assert calls[0]["early_stopping"] is False and calls[0]["length_penalty"] == 1.0
    lines = (ws / "pred/full.txt").read_text().splitlines()
    test = datasets.load_from_disk("data/prepared/li-liang/test")
    assert len(lines) == len(test) and all(lines)  # an empty output is written "Error", as theirs
    assert test[0]["context_ids"][-2:] == [220, EOS]
