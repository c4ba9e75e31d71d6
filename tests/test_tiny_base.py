"""The demo's stand-in base (stages/tools/tiny_base.py, issue 11): the copy task's data,
the copy-accuracy measure and the gate that refuses a base which does not copy."""
from __future__ import annotations

import torch

from conftest import SAMPLE, TOKENIZER
from stages.lib import cli
from stages.lib.gpt2 import EOS
from stages.tools.tiny_base import copy_accuracy, copy_batch, copy_candidates, main, schedule

TOKENS = torch.arange(EOS)


def batch(seed: int, n: int = 4, length: int = 5) -> dict:
    return copy_batch(TOKENS, n, length, torch.Generator().manual_seed(seed))


# Invariants of the copy task's data

def test_each_sequence_is_eos_span_eos_same_span():
    b = batch(0)
    ids = b["input_ids"]
    assert ids.shape == (4, 2 * 5 + 2)
    assert (ids[:, 0] == EOS).all() and (ids[:, 6] == EOS).all()
    assert torch.equal(ids[:, 1:6], ids[:, 7:])
    assert not (ids[:, 1:6] == EOS).any()  # EOS only as the separator
    assert (b["attention_mask"] == 1).all()


def test_the_loss_covers_the_repeat_only():
    b = batch(1)
    labels = b["labels"]
    assert (labels[:, :7] == -100).all()  # the first span and both separators are context
    assert torch.equal(labels[:, 7:], b["input_ids"][:, 7:])


def test_same_seed_same_batch_other_seed_other_batch():
    assert torch.equal(batch(3)["input_ids"], batch(3)["input_ids"])
    assert not torch.equal(batch(3)["input_ids"], batch(4)["input_ids"])


def test_spans_come_from_the_given_tokens_only():
    few = torch.tensor([11, 22, 33])
    b = copy_batch(few, 8, 6, torch.Generator().manual_seed(0))
    assert set(b["input_ids"].unique().tolist()) <= {11, 22, 33, EOS}


def test_the_sampled_softmax_holds_every_label_once_and_sorted():
    b = batch(2)
    cand = copy_candidates(b, EOS + 1, 50, torch.Generator().manual_seed(0))
    assert torch.equal(cand, cand.unique())  # sorted, distinct: searchsorted maps labels to rows
    labels = b["labels"][b["labels"] != -100]
    assert torch.isin(labels, cand).all()
    assert len(cand) <= b["input_ids"].numel() + 50


def test_schedule_warms_up_then_decays_to_a_tenth_or_stays():
    f = schedule(100, 10, decay=True)
    assert [f(s) for s in range(10)] == sorted(f(s) for s in range(10)) and f(9) == 1.0
    assert abs(f(99) - 0.1) < 1e-3 and f(50) < f(20)
    assert schedule(100, 10, decay=False)(99) == 1.0


# The copy-accuracy measure: a perfect copier scores 1, a model that never copies 0

class Fake(torch.nn.Module):
    """Predicts the token `lag` positions back (lag = span length + 1: a perfect copier)."""

    def __init__(self, lag: int):
        super().__init__()
        self.lag = lag

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, EOS + 1)
        src = torch.roll(input_ids, self.lag - 1, dims=1)  # position t predicts t+1 = the token at t+1-lag
        logits.scatter_(2, src.unsqueeze(-1), 1.0)
        return type("Out", (), {"logits": logits})()


def test_copy_accuracy_is_one_for_a_copier_and_zero_for_a_repeater():
    gen = torch.Generator().manual_seed(0)
    assert copy_accuracy(Fake(lag=9), TOKENS, gen, n=8, length=8) == 1.0
    assert copy_accuracy(Fake(lag=1), TOKENS, gen, n=8, length=8) == 0.0  # predicts its input token again


# The gate: a base that does not copy is refused, and nothing is written

def test_a_base_below_the_gate_fails_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "base"
    args = ["--train", str(SAMPLE / "trainset.csv"), "--tokenizer", str(TOKENIZER), "--out", str(out),
            "--layers", "1", "--width", "16", "--heads", "2", "--copy-steps", "2", "--copy-mix", "2",
            "--epochs", "0.01", "--min-copy-accuracy", "0.5"]
    assert cli.run("tiny_base", main, args) == 1
    assert "min-copy-accuracy" in capsys.readouterr().err
    assert not out.exists()
