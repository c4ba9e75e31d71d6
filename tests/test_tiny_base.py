"""The demo's stand-in base (stages/tiny_base.py): what it is pretrained on, specified. It must never see the E2E
MR syntax or test text, and what it learns to copy must be in its context."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from stages.e2e import read_e2e_csv
from stages.preprocess import load_tokenizer
from stages.tiny_base import examples, keywords, loss_on_targets, name_words, swap_names
from stages.train import EOS, collate

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("name[The Eagle], near[Café Rouge], food[French]", "The Eagle serves French food near Café Rouge."),
        ("name[Aromi], area[riverside]", "Aromi is by the riverside."),
        ("name[Cotto]", "Try Cotto, it is in the city centre.")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ROOT / "data" / "gpt2" / "tokenizer.json")


def test_pretraining_text_never_holds_the_mr_syntax_or_the_mr_itself(tok):
    rows = read_e2e_csv(ROOT / "data" / "sample" / "trainset.csv")[:200]
    exs = examples(rows, tok, random.Random(0), name_words(tok), p_lm=0.25, p_swap=0.7)
    assert len(exs) == len(rows)
    for (mr, _), ex in zip(rows, exs):
        text = tok.decode(ex["input_ids"])
        assert "[" not in text and "]" not in text and mr not in text
        assert "eatType" not in text and "familyFriendly" not in text


def test_targets_are_the_reference_and_context_spans_come_from_it(tok):
    rng = random.Random(1)
    for ex, (_, ref) in zip(examples(ROWS * 20, tok, rng, name_words(tok), p_lm=0.0, p_swap=0.0), ROWS * 20):
        target = tok.decode(ex["input_ids"][ex["n_context"]:])
        assert target == " " + ref + "<|endoftext|>"
        assert ex["input_ids"][ex["n_context"] - 1] == EOS  # the context ends like a fine-tuning context
        context = tok.decode(ex["input_ids"][:ex["n_context"] - 1]).replace("<|endoftext|>", "")
        for word in context.replace("(", " ").replace(")", " ").replace("|", " ").replace(";", " ").split():
            assert word.strip("<>{}',/*") in ref


def test_plain_lm_share_one_gives_the_plain_layout(tok):
    ex = examples(ROWS, tok, random.Random(0), name_words(tok), p_lm=1.0, p_swap=0.0)[1]
    assert ex["n_context"] == 1 and ex["input_ids"][0] == EOS


def test_swapped_names_are_replaced_everywhere_and_listed_in_the_context(tok):
    words = name_words(tok)
    rng = random.Random(3)
    ref, held = swap_names(ROWS[0][1], ["The Eagle", "Café Rouge"], rng, words)
    assert "The Eagle" not in ref and "Café Rouge" not in ref and len(held) == 2
    assert all(h in ref for h in held)
    assert all(h in keywords(ref, held, rng) for h in held)
    assert swap_names("No names here.", ["Zizzi"], rng, words) == ("No names here.", [])


def test_same_seed_same_examples(tok):
    a = examples(ROWS * 5, tok, random.Random(7), name_words(tok), 0.25, 0.7)
    b = examples(ROWS * 5, tok, random.Random(7), name_words(tok), 0.25, 0.7)
    c = examples(ROWS * 5, tok, random.Random(8), name_words(tok), 0.25, 0.7)
    assert a == b and a != c


def test_loss_only_on_labelled_positions_and_corpus_softmax_matches_full_on_the_full_vocabulary():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=8, n_layer=1, n_head=2, n_positions=32))
    model.eval()  # collate pads with EOS = 50256: the real vocabulary size, a tiny width
    batch = collate([{"input_ids": [3, 4, 5, 6, 7], "n_context": 2}, {"input_ids": [8, 9, 10], "n_context": 1}])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 50257), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss_on_targets(model, batch), want, atol=1e-6)
    assert torch.allclose(loss_on_targets(model, batch, torch.arange(50257)), want, atol=1e-6)
    partial = loss_on_targets(model, batch, torch.tensor([4, 5, 6, 7, 9, 10, 20]))
    assert partial < want  # fewer competitors, lower loss
