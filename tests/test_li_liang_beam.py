"""stages.lib.li_liang_beam: Li & Liang's beam search (their transformers 3.2 fork's generate()), by a plain reference.

The reference below is written from their generation_utils.py (commit 6519d30), not from our implementation: one
context at a time, no cache, no padding, Python loops. The rules it encodes (their line numbers):
  num_beams=1 is greedy argmax of the logits with banned ids at -inf, up to the first EOS (488, 560-647);
  beam scores start [0, -1e9, ...] in float32 and are rounded to float32 each step (683-688, 833);
  log p = log_softmax(logits), then banned ids -> -inf, not renormalised (715, 109-116);
  the top 2K of beam score + log p are walked in rank order: an EOS at rank < K finishes a hypothesis (prompt +
  generated, no EOS), an EOS at rank >= K is skipped, other tokens continue a beam until K do (766-815);
  a hypothesis scores sum log p / (prompt + generated) ** length_penalty (1059) and enters the K-best list
  (1060-1067); the context is done once it has K and the worst >= the step's best / cur_len ** length_penalty
  (818-820, 1069-1082); else after max_length every beam is offered (853-873); the best is sorted(...).pop() (885).
`variant` switches on one plausible mistake at a time; a test checks that our cases tell each one apart, so the
equivalence tests would catch it.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TOKENIZER, float32_copy, nan_logits_copy, peaked_gpt2
from stages.lib.li_liang_beam import RUN_GENERATION, clean_up_tokenization, li_liang_beam_search, run_generation_text

VOCAB = 64
EOS = 5
BANNED = (7, 9)          # stand-ins for their bad words 628 ("\n\n") and 198 ("\n")


@pytest.fixture(scope="module")
def model():
    """A tiny peaked GPT-2 (conftest.peaked_gpt2, init std 0.2); the EOS is made likely enough that most searches
    finish several hypotheses and many stop before max_length, and the banned ids likely enough that banning them
    before or after the softmax changes the scores. (Model seed, init std and boosts were chosen so that every
    variant below changes some output.)"""
    return peaked_gpt2(VOCAB, 0.2, {EOS: 3.0, BANNED[0]: 1.5, BANNED[1]: 1.5})


@pytest.fixture(scope="module")
def contexts():
    """Six prompts of different lengths, decoded together so that left padding is exercised; short ones make
    the prompt's share of the normalising length large."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, VOCAB, (n,), generator=g).tolist() for n in (1, 2, 3, 5, 7, 12)]


class Hypotheses:
    """Their BeamHypotheses (lines 1037-1082), as written there; `length` is what they take as len(hyp)."""

    def __init__(self, num_beams, length_penalty, early_stopping):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.beams, self.worst_score = [], 1e9

    def add(self, hyp, length, sum_logprobs):
        score = sum_logprobs / length ** self.length_penalty
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self.beams) > self.num_beams:
                sorted_scores = sorted([(s, idx) for idx, (s, _) in enumerate(self.beams)])
                del self.beams[sorted_scores[0][1]]
                self.worst_score = sorted_scores[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


def next_logits(model, rows):
    """Full forward passes, no cache: the last position's logits of each row (rows of equal length)."""
    with torch.no_grad():
        return model(torch.tensor(rows)).logits[:, -1, :].clone()


def reference(model, context, num_beams, penalty, banned, max_new, early_stopping=False, variant=None):
    """(generated ids without EOS, stats) for one context, as their generate() with batch size 1."""
    banned = [b for b in banned if b != EOS]                        # line 111
    max_length = len(context) + max_new                             # run_generation.py line 1235
    stats = {"hypotheses": 0, "stopped_early": False, "winner_finished": False}
    if num_beams == 1 and variant != "beam_for_one":                # greedy, lines 560-647
        ids = list(context)
        while len(ids) < max_length:
            logits = next_logits(model, [ids])[0]
            logits[banned] = -math.inf
            token = int(torch.argmax(logits))
            if token == EOS:
                stats["winner_finished"] = True
                break
            ids.append(token)
        return ids[len(context):], stats

    K = num_beams
    hyps = Hypotheses(K, penalty, early_stopping or variant == "early_stopping")
    input_ids = [list(context) for _ in range(K)]
    beam_scores = torch.zeros(K, dtype=torch.float)
    beam_scores[1:] = -1e9
    cur_len, done, width = len(context), False, K

    def length_of(hyp, finished):
        if variant == "length_generated_only":
            return len(hyp) - len(context) + finished
        return len(hyp) + (finished and variant == "length_counts_eos")

    while cur_len < max_length:
        logits = next_logits(model, input_ids)
        if variant == "ban_before_softmax":
            logits[:, banned] = -math.inf
        scores = F.log_softmax(logits, dim=-1)
        if variant != "ban_before_softmax":
            scores[:, banned] = -math.inf
        next_scores = (scores + beam_scores[:, None]).view(-1)
        next_scores, next_tokens = torch.topk(next_scores, 2 * width, largest=True, sorted=True)
        chosen = []
        for rank, (flat, score) in enumerate(zip(next_tokens.tolist(), next_scores.tolist())):
            beam_id, token = divmod(flat, VOCAB)
            if token == EOS:
                if rank >= width and variant != "eos_beyond_top_k":
                    continue
                hyps.add(input_ids[beam_id], length_of(input_ids[beam_id], True), score)
                stats["hypotheses"] += 1
            elif variant != "drop_finished" or rank < width:
                chosen.append((score, token, beam_id))
            if len(chosen) == width:
                break
        if variant == "drop_finished":                              # the beam shrinks instead of refilling
            width = len(chosen)
        checked_len = cur_len + 1 if variant == "is_done_next_len" else cur_len
        done = width == 0 or hyps.is_done(next_scores.max().item(), checked_len)
        if done:
            stats["stopped_early"] = cur_len + 1 < max_length
            break
        beam_scores = torch.tensor([s for s, _, _ in chosen], dtype=torch.float)
        input_ids = [input_ids[b] + [t] for _, t, b in chosen]
        cur_len += 1
    if not done and not (variant == "no_final_hypotheses" and hyps.beams):
        for k in range(width):
            hyps.add(input_ids[k], length_of(input_ids[k], False), beam_scores[k].item())
    best = sorted(hyps.beams, key=lambda x: x[0]).pop()[1]
    stats["winner_finished"] = len(best) < max_length          # an EOS ended it: shorter than max_length
    return best[len(context):], stats


# (num_beams, length_penalty, banned ids, max new tokens)
CASES = [
    (1, 1.0, BANNED, 12),
    (1, 1.0, (), 3),
    (2, 0.0, (), 12),
    (2, 0.9, BANNED, 20),
    (3, 1.5, BANNED, 20),
    (3, 2.5, (), 20),
    (4, 0.9, BANNED, 5),
    (4, 1.0, (), 20),
    (5, 1.0, BANNED, 20),
    (5, 2.0, BANNED, 20),
    (5, 1.5, (), 12),
]


@pytest.fixture(scope="module")
def expected(model, contexts):
    return {case: [reference(model, c, *case) for c in contexts] for case in CASES}


# --- invariants of the test setup: the cases exercise what they claim to ---

def test_cases_finish_mid_search_stop_early_and_keep_unfinished_winners(expected):
    stats = [s for case, runs in expected.items() if case[0] > 1 for _, s in runs]
    assert sum(s["hypotheses"] for s in stats) >= 40
    assert any(s["stopped_early"] for s in stats), "no context stopped by is_done before max_length"
    assert any(not s["stopped_early"] for s in stats), "every context stopped early"
    assert any(s["winner_finished"] for s in stats), "no EOS-terminated winner"
    assert any(not s["winner_finished"] for s in stats), "no winner cut by max_length"
    greedy = [s for case, runs in expected.items() if case[0] == 1 for _, s in runs]
    assert any(s["winner_finished"] for s in greedy) and any(not s["winner_finished"] for s in greedy)


def test_banned_ids_are_likely_enough_to_matter(model, contexts):
    logp = F.log_softmax(next_logits(model, [c[:1] for c in contexts]), -1)
    assert logp[:, list(BANNED)].exp().sum(-1).min() > 0.05


def test_one_beam_search_equals_their_greedy_path(model, contexts):
    """generate() sends num_beams=1 to greedy search (line 488); a 1-beam search would give the same ids: an EOS at
    rank 0 becomes the only hypothesis and is_done compares it with itself (equal: done), any other rank-0 token is
    greedy's argmax, and an EOS at rank 1 >= K is skipped. So the dispatch cannot be a source of difference."""
    for case in [c for c in CASES if c[0] == 1]:
        for c in contexts:
            assert reference(model, c, *case, variant="beam_for_one")[0] == reference(model, c, *case)[0]


# An EOS at rank >= K (skipped by line 803) always scores below an EOS of the same step at a lower rank, which is
# added, so it could never be the winner: adding it changes only when the search stops. One case of ours shows it.
@pytest.mark.parametrize("variant", ["length_generated_only", "length_counts_eos", "early_stopping",
                                     "ban_before_softmax", "drop_finished", "eos_beyond_top_k",
                                     "no_final_hypotheses", "is_done_next_len"])
def test_each_plausible_mistake_changes_some_output(model, contexts, expected, variant):
    changed = any(
        reference(model, c, *case, variant=variant)[0] != expected[case][i][0]
        for case in CASES for i, c in enumerate(contexts)
    )
    assert changed, f"the cases cannot tell {variant} from their search"


# --- the specification: our batched, cached search gives the reference's token ids ---

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_matches_reference(model, contexts, expected, case, batch_size):
    k, penalty, banned, max_new = case
    ours = li_liang_beam_search(model, contexts, num_beams=k, max_new_tokens=max_new, length_penalty=penalty,
                                banned_ids=banned, eos_id=EOS, batch_size=batch_size)
    assert ours == [out for out, _ in expected[case]]


def test_early_stopping_true_matches_reference(model, contexts):
    case = (4, 1.0, BANNED, 24)
    ours = li_liang_beam_search(model, contexts, num_beams=4, max_new_tokens=24, length_penalty=1.0,
                                banned_ids=BANNED, eos_id=EOS, early_stopping=True, batch_size=5)
    assert ours == [reference(model, c, *case, early_stopping=True)[0] for c in contexts]


def test_float32_batched_equals_unbatched(model, contexts):
    """In fp32 (their dtype) padding and batching must not change the outputs either."""
    m = float32_copy(model)
    kw = dict(num_beams=5, max_new_tokens=24, length_penalty=1.0, banned_ids=BANNED, eos_id=EOS)
    assert li_liang_beam_search(m, contexts, batch_size=5, **kw) == li_liang_beam_search(m, contexts, batch_size=1,
                                                                                         **kw)


def test_outputs_hold_no_eos_no_banned_id_and_fit(model, contexts):
    outs = li_liang_beam_search(model, contexts, num_beams=3, max_new_tokens=24, length_penalty=0.9,
                                banned_ids=BANNED, eos_id=EOS, batch_size=5)
    for out in outs:
        assert len(out) <= 24 and EOS not in out and not set(out) & set(BANNED)


def test_the_eos_is_never_banned(model, contexts):
    """Line 111 drops a bad word equal to the EOS: banning it changes nothing."""
    kw = dict(num_beams=3, max_new_tokens=12, length_penalty=1.0, eos_id=EOS, batch_size=5)
    assert (li_liang_beam_search(model, contexts, banned_ids=(EOS, *BANNED), **kw)
            == li_liang_beam_search(model, contexts, banned_ids=BANNED, **kw))


def test_their_e2e_settings():
    assert RUN_GENERATION == dict(num_beams=5, max_new_tokens=100, length_penalty=1.0, banned_ids=(628, 198),
                                  eos_id=50256, early_stopping=False)


def test_bad_arguments(model):
    kw = dict(max_new_tokens=3, length_penalty=1.0, banned_ids=(), eos_id=EOS, batch_size=1)
    with pytest.raises(ValueError):
        li_liang_beam_search(model, [[]], num_beams=2, **kw)
    with pytest.raises(ValueError):
        li_liang_beam_search(model, [[1]], num_beams=0, **kw)
    with pytest.raises(ValueError):
        li_liang_beam_search(model, [[1]], num_beams=2, **{**kw, "length_penalty": -1.0})


def test_nan_logits_fail_loudly(model):
    with pytest.raises(ValueError, match="NaN"):
        li_liang_beam_search(nan_logits_copy(model), [[1, 2]], num_beams=2, max_new_tokens=3, length_penalty=1.0, banned_ids=(),
                             eos_id=EOS, batch_size=1)


# --- their output text (run_generation.py lines 1292-1315) ---

@pytest.fixture(scope="module")
def decode():
    from stages.lib.gpt2 import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    return lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False), tok


def test_clean_up_is_their_list_of_replacements():
    assert clean_up_tokenization("a . b , c ? d ! e ' f is n't I 'm it 's we 've they 're") == \
        "a. b, c? d! e'f isn't I'm it's we've they're"


def test_output_text_is_decoded_cleaned_cut_and_stripped(decode):
    dec, tok = decode
    context = tok(" name : Blue Spice | area : city centre <|endoftext|>")["input_ids"]
    assert context[-2:] == [220, 50256]                  # " ... centre " then <|endoftext|>, as in training
    generated = tok(" Blue Spice is in the city centre .  ")["input_ids"]
    assert run_generation_text(dec, context, generated, 100) == "Blue Spice is in the city centre."
    # without an EOS (max length reached) the text is cut nowhere; a decoded "<|endoftext|>" cuts it
    assert run_generation_text(dec, context, generated, len(generated)) == "Blue Spice is in the city centre."
    assert run_generation_text(dec, context, generated + [50256] + generated, 100) == \
        "Blue Spice is in the city centre."
    assert run_generation_text(dec, context, tok("  ")["input_ids"], 100) == "Error"
