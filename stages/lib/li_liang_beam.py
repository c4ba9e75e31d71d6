"""Beam search as Li & Liang's transformers fork runs it for E2E fine-tuning, batched and with a KV cache.

Source: XiangLi1999/PrefixTuning, commit 6519d30e69b15a180f23e2cd41b766d3f62b8e82 (transformers 3.2.0 fork),
transformers/src/transformers/generation_utils.py: `generate` (lines 121-534), `_generate_beam_search` (649-906),
`BeamHypotheses` (1037-1082), `_generate_no_beam_search` (536-647), `postprocess_next_token_scores` (71-118).
gpt2/run_generation.py calls it for a fine-tuned model (lines 1231-1245, decode_mode 'beam', batch size 1):
num_beams=5, max_length = 100 + prompt length (`--length 100`, gen.py line 266), eos_token_id=50256,
bad_words_ids=[[628], [198]] ("\\n\\n" and "\\n"), do_sample=False, repetition_penalty=1.0; the rest are config
defaults (configuration_utils.py lines 166-178): length_penalty 1.0, early_stopping False, no_repeat_ngram_size 0,
min_length 0. `RUN_GENERATION` holds them.

What their code does for one context, and what we reproduce:
- A step scores every beam: log_softmax of the logits (line 715), THEN the banned ids are set to -inf (lines 109-116):
  the ban comes after the softmax, so the other tokens' log-probs are not renormalised. An id equal to the EOS is
  never banned (line 111 filters it out).
- Beam scores start at [0, -1e9, ..., -1e9] (line 687), so step 0 expands beam 0 only; they are float32 (line 683)
  and are re-created in float32 each step (line 833), whatever the model's dtype.
- The top 2K of beam score + log p over beam x vocab (line 766) are walked in rank order (lines 791-815): an EOS
  among the first K ranks finishes its beam as a hypothesis (an EOS at rank >= K is skipped); any other token
  continues a beam, until K beams continue. Finished beams are refilled, the beam never shrinks.
- A hypothesis is the prompt + generated tokens WITHOUT the EOS (line 806), scored sum log p (EOS included) /
  len(hypothesis) ** length_penalty (line 1059): len counts the prompt tokens and the generated ones, not the EOS.
  A new one enters the K-best list if the list has < K or it beats the worst (lines 1060-1067).
- Stopping, early_stopping=False (lines 818-820, 1069-1082): after a step the context is done once it holds K
  hypotheses and the worst of them >= the step's best candidate score / cur_len ** length_penalty, cur_len being the
  length BEFORE this step's token (prompt + generated so far). A done context stops; no further hypotheses.
- Otherwise it runs until prompt + generated = max_length (line 696), i.e. `max_new_tokens` steps; then every live
  beam is offered with its float32 score / max_length ** length_penalty (lines 853-873).
- The output is the best hypothesis: `sorted(beams, key=score).pop()` (lines 885-888), so a tie goes to the one
  stored last.
- num_beams=1 is not a 1-beam search: generate() takes `_generate_no_beam_search` (line 488): greedy argmax of the
  logits with the banned ids at -inf, stopping at the first EOS.

Batching: their run decodes one MR at a time (run_generation.py lines 976-1004). We decode a batch with left
padding (pads masked, position ids from the mask) and drop a context's rows from the batch and the cache when it is
done, so each context gets what it gets alone. fp16/bf16 logits are upcast to float32 first (their fork would run
log_softmax in half precision; their E2E run is fp32).

Checked once against their own code (not shipped): their generation_utils.py exec'd from the mirror, its generate()
called per context with run_generation.py's arguments through a thin wrapper giving our GPT-2 their
prepare_inputs_for_generation (modeling_gpt2.py lines 780-835) and _reorder_cache: identical ids in 624 of 624
(context, setting) pairs: 8 contexts of 1-21 tokens x beams 1/2/3/5 x length penalty 0.5-2.0 x ban on/off, fp32 and
fp64 with a 64-token vocabulary (20 steps), and fp32 with the real 50,257-token vocabulary, EOS 50256 and bad words
628/198 (40 steps); our side decoded the 8 contexts as one batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.lib.decoding import left_pad

# run_generation.py lines 1231-1245 + gen.py line 266 + the config defaults (configuration_utils.py lines 166-178).
RUN_GENERATION = dict(num_beams=5, max_new_tokens=100, length_penalty=1.0, banned_ids=(628, 198), eos_id=50256,
                      early_stopping=False)
EOS_TEXT = "<|endoftext|>"


class _Hypotheses:
    """`BeamHypotheses` (generation_utils.py lines 1037-1082), storing generated ids and taking the hypothesis
    length (prompt + generated, no EOS) as an argument instead of len(prompt + generated ids)."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.beams: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def add(self, generated: list[int], length: int, sum_logprobs: float) -> None:
        score = sum_logprobs / length ** self.length_penalty
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, generated))
            if len(self.beams) > self.num_beams:
                sorted_scores = sorted([(s, idx) for idx, (s, _) in enumerate(self.beams)])
                del self.beams[sorted_scores[0][1]]
                self.worst_score = sorted_scores[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty

    def best(self) -> list[int]:
        return sorted(self.beams, key=lambda x: x[0]).pop()[1]   # line 885-888: the last of equal scores


def _logits(model, ids, mask, cache, step, fed, prompt_len):
    """The next-token logits of every row, (R, V) in float32 or float64, and the cache.

    step 0: the padded prompts (ids, mask: (R, width)). step i > 0: `fed` (R,), the token chosen at step i-1, at
    position prompt_len + i - 1; `mask` (R, width) is each row's prompt mask, the generated positions are all real.
    """
    if step == 0:
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
    else:
        rows = fed.shape[0]
        attn = torch.cat([mask, torch.ones(rows, step, dtype=torch.long, device=mask.device)], 1)
        out = model(input_ids=fed[:, None], attention_mask=attn, position_ids=(prompt_len + step - 1)[:, None],
                    cache=cache, use_cache=True)
    logits = out.logits[:, -1, :]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if torch.isnan(logits).any():
        raise ValueError(f"beam search: NaN in the model's logits at step {step}")
    return logits, out.cache


@torch.no_grad()
def _greedy_batch(model, contexts, max_new_tokens, banned, eos_id):
    """num_beams=1: `_generate_no_beam_search` (lines 560-647), greedy argmax of the banned logits up to the EOS."""
    device = model.device
    ids, mask = (t.to(device) for t in left_pad(contexts))
    prompt_len = mask.sum(1)
    out: list[list[int]] = [[] for _ in contexts]
    live = list(range(len(contexts)))                                # contexts still generating, in row order
    cache, fed = None, None
    for step in range(max_new_tokens):
        logits, cache = _logits(model, ids, mask, cache, step, fed, prompt_len)
        if banned:
            logits[:, banned] = float("-inf")                        # lines 109-116, on the logits (line 584)
        tokens = logits.argmax(-1).tolist()                          # line 616
        keep = []
        for row, (c, t) in enumerate(zip(live, tokens)):
            if t == eos_id:                                          # lines 629-639: finished at its EOS
                continue
            out[c].append(t)
            keep.append(row)
        if not keep:
            break
        rows = torch.tensor(keep, dtype=torch.long, device=device)
        cache.reorder_cache(rows)                                    # drops finished rows from the cache
        live = [live[r] for r in keep]
        mask, prompt_len = mask[rows], prompt_len[rows]
        fed = torch.tensor([tokens[r] for r in keep], dtype=torch.long, device=device)
    return out


@torch.no_grad()
def _beam_batch(model, contexts, K, max_new_tokens, length_penalty, banned, eos_id, early_stopping):
    """One batch of contexts, num_beams K >= 2 -> the generated ids of each one's best hypothesis (no EOS)."""
    device = model.device
    ids, mask = (t.to(device) for t in left_pad(contexts))
    prompt_len = mask.sum(1)                                         # (R,): one row per context at step 0
    plen = [len(c) for c in contexts]
    hyps = [_Hypotheses(K, length_penalty, early_stopping) for _ in contexts]
    live = list(range(len(contexts)))                                # contexts not done, in batch order
    beams: dict[int, list[list[int]]] = {c: [[] for _ in range(K)] for c in live}   # generated ids per beam
    beam_scores = torch.zeros(len(live), K, dtype=torch.float, device=device)        # line 683: float32
    beam_scores[:, 1:] = -1e9                                        # line 687: step 0 expands beam 0 only
    cache, fed = None, None

    for step in range(max_new_tokens):
        logits, cache = _logits(model, ids, mask, cache, step, fed, prompt_len)
        scores = F.log_softmax(logits, dim=-1)                       # line 715
        if banned:
            scores[:, banned] = float("-inf")                        # lines 109-116: after the softmax
        V = scores.shape[-1]
        A = len(live)
        if step == 0:                                                # one row per context: all K beams are it
            scores = scores[:, None, :].expand(A, K, V)
        else:
            scores = scores.view(A, K, V)
        next_scores = (scores + beam_scores[:, :, None]).view(A, K * V)     # line 759, same dtype promotion
        top_scores, top_ids = torch.topk(next_scores, 2 * K, dim=1, largest=True, sorted=True)   # line 766
        top_scores, top_ids = top_scores.tolist(), top_ids.tolist()

        keep_rows, new_scores, new_tokens, still = [], [], [], []
        for a, c in enumerate(live):                                 # lines 774-825, one context at a time
            cur_len = plen[c] + step
            chosen = []
            for rank, (flat, score) in enumerate(zip(top_ids[a], top_scores[a])):
                beam_id, token = divmod(flat, V)
                if token == eos_id:
                    if rank >= K:                                    # lines 802-804
                        continue
                    hyps[c].add(list(beams[c][beam_id]), cur_len, score)   # prompt + generated, no EOS
                else:
                    chosen.append((score, token, beam_id))
                if len(chosen) == K:
                    break
            if len(chosen) != K:
                raise RuntimeError("beam search: fewer than num_beams live candidates (vocabulary too small)")
            if hyps[c].is_done(top_scores[a][0], cur_len):           # lines 818-820 (max of a sorted row)
                continue                                             # done: no more beams, no final offer
            still.append(c)
            beams[c] = [beams[c][b] + [t] for _, t, b in chosen]
            new_scores.append([s for s, _, _ in chosen])
            new_tokens += [t for _, t, _ in chosen]
            keep_rows += [a if step == 0 else a * K + b for _, _, b in chosen]
        if not still:                                                # line 828: all done
            break
        for c in set(live) - set(still):
            del beams[c]
        rows = torch.tensor(keep_rows, dtype=torch.long, device=device)     # (A' * K,) source rows
        cache.reorder_cache(rows)                                    # reorders beams, drops done contexts
        mask, prompt_len = mask[rows], prompt_len[rows]              # a beam's rows share its prompt's mask
        beam_scores = torch.tensor(new_scores, dtype=torch.float, device=device)     # line 833: float32 again
        fed = torch.tensor(new_tokens, dtype=torch.long, device=device)
        live = still
    else:
        final = beam_scores.tolist()                                 # float32 values, as line 871's .item()
        for a, c in enumerate(live):                                 # lines 853-873: offer every live beam
            for k in range(K):
                hyps[c].add(beams[c][k], plen[c] + max_new_tokens, final[a][k])
    return [h.best() for h in hyps]


def li_liang_beam_search(model, contexts: list[list[int]], *, num_beams: int, max_new_tokens: int,
                         length_penalty: float, banned_ids, eos_id: int, early_stopping: bool = False,
                         batch_size: int) -> list[list[int]]:
    """Generated token ids per context, as Li & Liang's generate() gives them for that context alone; no EOS.

    model: a transformers (5.x) GPT2LMHeadModel, or any causal LM taking attention_mask, position_ids and `cache`
    and returning a reorderable Cache. contexts: the prompt ids; theirs is " " + MR + " " + "<|endoftext|>" encoded
    (run_generation.py lines 158, 998: [..., 220, 50256]). max_new_tokens: their max_length minus the prompt length
    (100). length_penalty: theirs is 1.0; their generate() asserts > 0 (line 317), we also accept 0 (len ** 0 = 1).
    banned_ids: single-token bad words, theirs (628, 198). `RUN_GENERATION` holds their E2E values.
    Outputs do not depend on batch_size. To get their text, pass the ids to `run_generation_text`.
    """
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("num_beams, max_new_tokens and batch_size must be >= 1")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("empty context")
    banned = sorted({int(b) for b in banned_ids} - {int(eos_id)})   # line 111: the EOS is never a bad word
    model.eval()
    results = []
    for start in range(0, len(contexts), batch_size):
        batch = [list(c) for c in contexts[start:start + batch_size]]
        if num_beams == 1:
            results += _greedy_batch(model, batch, max_new_tokens, banned, int(eos_id))
        else:
            results += _beam_batch(model, batch, num_beams, max_new_tokens, float(length_penalty), banned,
                                   int(eos_id), bool(early_stopping))
    return results


def clean_up_tokenization(text: str) -> str:
    """The fork's decode(..., clean_up_tokenization_spaces=True) post-processing (tokenization_utils_base.py lines
    2765-2776). transformers 5 no longer applies it to BPE tokenizers, so we do."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


def run_generation_text(decode, context: list[int], generated: list[int], max_new_tokens: int,
                        eos_id: int = 50256) -> str:
    """The line run_generation.py writes for one MR (lines 1292-1315), from li_liang_beam_search's ids.

    decode: ids -> text, special tokens kept, no clean-up (e.g. `lambda ids: tok.decode(ids,
    clean_up_tokenization_spaces=False)`). generate() returns prompt + hypothesis + EOS if it fits in max_length
    (lines 900-904); the text is decoded with clean-up, the decoded prompt's length cut off its front, the rest cut at
    the first "<|endoftext|>" and stripped; an empty output is written as "Error".
    """
    full = list(context) + list(generated) + ([eos_id] if len(generated) < max_new_tokens else [])
    text = clean_up_tokenization(decode(full))[len(clean_up_tokenization(decode(list(context)))):]
    cut = text.find(EOS_TEXT)
    if cut >= 0:
        text = text[:cut]
    text = text.strip()
    return text if text else "Error"
