"""stages.lib.beam: the authors' beam search (microsoft/LoRA examples/NLG/src/gpt2_beam.py), specified by a plain reference.

The reference below is written from the algorithm, not from our implementation: one context at a time, a Python
loop over beams, a full forward pass per beam and step (no cache, no padding). The rules it encodes:
  step 0 expands one live beam; each step takes the top num_beams of beam score + log p over beam x vocab;
  log p = log(softmax(logits)) with banned n-gram continuations set to -inf on the logits (output tokens only);
  every beam ending in an EOS id becomes a candidate scored sum(log p) / len**penalty (len counts the EOS) and
  its score becomes -inf; after the last step every beam is a candidate; a candidate replaces the best only if
  strictly better; the output is the best candidate cut before its EOS.
`variant` switches on one plausible mistake at a time; a test checks that our cases tell each one apart, so the
equivalence tests would catch it.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import float32_copy, nan_logits_copy, peaked_gpt2
from stages.lib.beam import authors_beam_search
from stages.lib.decoding import ban_repeated_ngrams

VOCAB = 64
EOS = (5, 9)
STEPS = 14


@pytest.fixture(scope="module")
def model():
    """A tiny peaked GPT-2 (conftest.peaked_gpt2, init std 0.3) with the EOS ids made likely enough to finish
    beams mid-search."""
    return peaked_gpt2(VOCAB, 0.3, {e: 1.4 for e in EOS})


@pytest.fixture(scope="module")
def contexts(model):
    """Five contexts of different lengths: random tokens, then 4 greedy tokens of the model, so the context
    holds n-grams the model likes to repeat (a ban that wrongly counts the context then shows)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (3, 7, 1, 12, 5):
        c = torch.randint(10, VOCAB, (n,), generator=g).tolist()
        for _ in range(4):
            with torch.no_grad():
                logits = model(torch.tensor([c])).logits[0, -1]
            logits[list(EOS)] = -math.inf
            c.append(int(logits.argmax()))
        out.append(c)
    return out


def banned_tokens(tokens: list[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of `tokens`."""
    if n <= 0 or len(tokens) < n:
        return set()
    prefix = tokens[len(tokens) - n + 1:]
    return {tokens[j + n - 1] for j in range(len(tokens) - n + 1) if tokens[j:j + n - 1] == prefix}


def reference_search(model, context, num_beams, penalty, n, steps, eos, variant=None):
    """(output ids, stats). stats: eos_candidates = how many EOS candidates were offered, winner_finished."""
    if variant == "k_copies_first_step":
        beams, scores = [[] for _ in range(num_beams)], [0.0] * num_beams
    else:
        beams, scores = [[]], [0.0]
    width = num_beams                           # slots per step; only "drop_finished" lowers it
    best = None
    stats = {"eos_candidates": 0}

    def offer(score, tokens, finished):
        nonlocal best
        if best is None or best[0] < score:
            best = (score, tokens, finished)

    for _ in range(steps):
        entries = []
        for b, tokens in enumerate(beams):
            with torch.no_grad():
                history = context + tokens if variant == "ban_counts_context" else tokens
                logits = model(torch.tensor([context + tokens])).logits[0, -1].clone()
            ban = sorted(banned_tokens(history, n))
            if variant != "ban_after_softmax":
                logits[ban] = -math.inf
            logp = torch.log(torch.softmax(logits, dim=-1))
            if variant == "ban_after_softmax":
                logp[ban] = -math.inf
            entries += [(scores[b] + logp[v].item(), b, v) for v in range(VOCAB)]
        entries.sort(key=lambda e: -e[0])
        top = entries[:width]
        beams = [beams[b] + [v] for _, b, v in top]
        scores = [s for s, _, _ in top]
        for j, tokens in enumerate(beams):
            if tokens[-1] in eos:
                stats["eos_candidates"] += scores[j] > -math.inf
                length = len(tokens) - 1 if variant == "length_without_eos" else len(tokens)
                offer(scores[j] / max(length, 1) ** penalty, tokens, True)
                scores[j] = -math.inf
        if variant == "drop_finished":          # the beam shrinks instead of refilling
            keep = [j for j in range(len(beams)) if scores[j] > -math.inf]
            beams, scores = [beams[j] for j in keep], [scores[j] for j in keep]
            width = len(beams)
            if not beams:
                break
        if variant == "stop_when_k_finished" and stats["eos_candidates"] >= num_beams:
            break
    if variant != "no_final_candidates" or best is None:
        for j, tokens in enumerate(beams):
            offer(scores[j] / len(tokens) ** penalty, tokens, False)
    out = best[1]
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    stats["winner_finished"] = best[2]
    return out[:cut], stats


# (num_beams, length_penalty, no_repeat_ngram_size)
CASES = [(4, 0.8, 4), (3, 0.0, 2), (4, 1.5, 0), (5, 0.9, 3), (2, 1.0, 2)]


@pytest.fixture(scope="module")
def reference(model, contexts):
    return {case: [reference_search(model, c, *case, STEPS, EOS) for c in contexts] for case in CASES}


# --- invariants of the test setup: the cases exercise what they claim to ---

def test_cases_finish_mid_search_and_keep_unfinished_winners(reference):
    stats = [s for runs in reference.values() for _, s in runs]
    assert sum(s["eos_candidates"] for s in stats) >= 20
    assert any(s["winner_finished"] for s in stats), "no EOS-terminated winner"
    assert any(not s["winner_finished"] for s in stats), "no unfinished winner"
    assert any(s["eos_candidates"] > 1 and not s["winner_finished"] for s in stats), "no beaten EOS candidate"


@pytest.mark.parametrize("variant", ["ban_after_softmax", "k_copies_first_step", "length_without_eos",
                                     "drop_finished", "stop_when_k_finished", "no_final_candidates",
                                     "ban_counts_context"])
def test_each_plausible_mistake_changes_some_output(model, contexts, reference, variant):
    changed = any(
        reference_search(model, c, *case, STEPS, EOS, variant=variant)[0] != reference[case][i][0]
        for case in CASES for i, c in enumerate(contexts)
    )
    assert changed, f"the cases cannot tell {variant} from the authors' search"


# --- the specification: our batched, cached search gives the reference's token ids ---

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_matches_reference(model, contexts, reference, case, batch_size):
    k, penalty, n = case
    ours = authors_beam_search(model, contexts, num_beams=k, length_penalty=penalty, no_repeat_ngram_size=n,
                               max_new_tokens=STEPS, eos_ids=EOS, batch_size=batch_size)
    assert ours == [out for out, _ in reference[case]]


def test_float32_batched_equals_unbatched(model, contexts):
    """In fp32 (the authors' dtype) padding must not change the outputs either."""
    m = float32_copy(model)
    kw = dict(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=STEPS, eos_ids=EOS)
    assert authors_beam_search(m, contexts, batch_size=5, **kw) == authors_beam_search(m, contexts, batch_size=1, **kw)


def test_outputs_stop_before_eos_and_respect_the_ban(model, contexts):
    outs = authors_beam_search(model, contexts, num_beams=4, length_penalty=0.8, no_repeat_ngram_size=2,
                               max_new_tokens=STEPS, eos_ids=EOS, batch_size=5)
    for out in outs:
        assert len(out) <= STEPS and not set(out) & set(EOS)
        bigrams = list(zip(out, out[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_banned_tokens_match_the_plain_rule():
    g = torch.Generator().manual_seed(3)
    history = torch.randint(0, 4, (6, 11), generator=g)       # few symbols: many repeats
    for n in (1, 2, 3, 4, 12):
        banned = torch.isinf(ban_repeated_ngrams(history, torch.zeros(6, 4), n))
        for r in range(6):
            assert set(banned[r].nonzero().flatten().tolist()) == banned_tokens(history[r].tolist(), n)


def test_bad_arguments(model):
    with pytest.raises(ValueError):
        authors_beam_search(model, [[]], num_beams=2, length_penalty=1.0, no_repeat_ngram_size=0,
                            max_new_tokens=3, eos_ids=EOS, batch_size=1)
    with pytest.raises(ValueError):
        authors_beam_search(model, [[1]], num_beams=0, length_penalty=1.0, no_repeat_ngram_size=0,
                            max_new_tokens=3, eos_ids=EOS, batch_size=1)


def test_nan_logits_fail_loudly(model):
    with pytest.raises(ValueError, match="NaN"):
        authors_beam_search(nan_logits_copy(model), [[1, 2]], num_beams=2, length_penalty=1.0, no_repeat_ngram_size=0,
                            max_new_tokens=3, eos_ids=EOS, batch_size=1)
