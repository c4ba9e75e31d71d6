"""Beam search exactly as the LoRA authors' `gpt2_beam.py`, batched and with a KV cache.

Source: microsoft/LoRA, commit c4593f060e6a368d7bb5af5273b8e42810cdef90, examples/NLG/src/gpt2_beam.py,
`beam()` (lines 206-316) and `_add_beam_candidate()` (lines 182-203). What it does, and what we reproduce:

- Always all `eval_len` (our `max_new_tokens`) steps: `for i in range(0, args.eval_len)` (line 254), no stopping.
- Step 0 expands ONE live beam: only beam 0's log-probs enter the top-k (line 286), so the first `num_beams`
  tokens are distinct. Later steps take the top-k over beam x vocab of beam score + log p (lines 289-294).
- The repeated-n-gram ban looks at the generated tokens only (`history`, lines 304-307) and sets banned logits
  to -inf BEFORE the softmax (lines 168-177, then 278), so the remaining tokens' probabilities renormalise.
  log p is computed as log(softmax(logits)) (line 284), not log_softmax; we do the same so scores match bit for
  bit in fp32.
- After each step, every beam whose last token is in the EOS set becomes a finished candidate scored
  beam_score / len**length_penalty, len = number of generated tokens including the EOS (`history.shape[-1]`,
  line 194-195); its beam score becomes -inf (line 203), so the next top-k refills the slot from live beams.
- After the last step every beam is a candidate, scored the same way (lines 314-316, `eos_token_id=None`).
- A candidate replaces the context's best only if strictly better (`best_score[batch_id] < _score`, line 199):
  ties go to the earlier step, and within a step to the lower beam index (the higher-ranked slot of the sorted
  top-k). The best candidate is the output.

Batching: the authors decode with `--batch_size 1` (examples/NLG/README.md line 83). Their batched path has a
step-0 bug: the query is repeated num_beams times (line 237) but the first logits are read from rows `_bbatch`
= [0]*K + [1]*K + ... (lines 240, 257), which are copies of context b // K, not b; so with batch_size > 1 the
first token of most contexts comes from another context's distribution. Later steps are per-row correct (their
model writes each new key at `len_past = query_len + i` and masks the rest, model.py lines 158-176). We decode
every context as if alone, i.e. as their batch-size-1 run: left padding, pads masked, position ids from the mask.

Checked once against their own code (not shipped: their gpt2_beam.beam() and model.py from the mirror, our GPT-2
weights loaded into their model, their batch size 1): identical outputs for 24 contexts x 5 settings (beams 2-10,
length penalty 0-1.5, n-gram ban 0/2/3/4) in fp64 and fp32 with a 64-token vocabulary (20 steps), and in fp32
with the real 50,257-token vocabulary, EOS {50256, 7} and 64 steps: 360 of 360.
"""
from __future__ import annotations

import torch

from stages.lib.decoding import ban_repeated_ngrams, left_pad


def _offer(best_score, has_best, best_seq, best_len, scores, is_cand, history, num_beams):
    """Offer this step's candidates (`is_cand`, (B*K,)) to each context's best, as `_add_beam_candidate`.

    scores: (B*K,) already divided by len**penalty. Within a context the first maximal candidate in beam order
    is the one the authors' sequential loop keeps; it replaces the best only if strictly greater.
    """
    B = best_score.shape[0]
    cand = is_cand.view(B, num_beams)
    key = scores.view(B, num_beams).masked_fill(~cand, float("-inf"))     # non-candidates never win a max
    cand_score = key.max(1).values                                  # (B,)
    pick = (cand & (key == cand_score[:, None])).to(torch.int8).argmax(1)   # first maximal candidate
    any_cand = cand.any(1)
    better = any_cand & (~has_best | (cand_score > best_score))
    if better.any():
        rows = better.nonzero(as_tuple=True)[0]
        src = rows * num_beams + pick[rows]
        best_score[rows] = cand_score[rows]
        has_best[rows] = True
        best_seq[rows] = 0
        best_seq[rows, :history.shape[1]] = history[src]
        best_len[rows] = history.shape[1]


@torch.no_grad()
def _search_batch(model, contexts, num_beams, length_penalty, no_repeat_ngram_size, max_new_tokens, eos_ids):
    """One batch of contexts -> the winning candidate of each, as a list of token ids (EOS included if any)."""
    device = model.device
    B, K = len(contexts), num_beams
    ids, mask = (t.to(device) for t in left_pad(contexts))  # (B, width): every context ends at column width - 1
    ctx_len = mask.sum(1)                                            # (B,)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)

    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    past = out.cache                                                 # transformers 5: a reorderable Cache
    logits = out.logits[:, -1, :]                                    # (B, V): the one live beam of step 0
    row_mask = mask.repeat_interleave(K, 0)                          # (B*K, width), same for all beams
    row_len = ctx_len.repeat_interleave(K, 0)                        # (B*K,)
    base = torch.arange(B, device=device) * K                        # first row of each context

    best_score = torch.full((B,), float("-inf"), dtype=torch.float64, device=device)
    has_best = torch.zeros(B, dtype=torch.bool, device=device)
    best_seq = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    best_len = torch.zeros(B, dtype=torch.long, device=device)
    history = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    beam_scores = None

    for i in range(max_new_tokens):
        if i > 0:
            attn = torch.cat([row_mask, torch.ones(B * K, i, dtype=torch.long, device=device)], 1)
            out = model(input_ids=token[:, None], attention_mask=attn, position_ids=(row_len + i - 1)[:, None],
                        cache=past, use_cache=True)
            past, logits = out.cache, out.logits[:, -1, :]  # (B*K, V)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        V = logits.shape[-1]
        if no_repeat_ngram_size > 0 and i > 0:                        # ban on the logits, before the softmax
            logits = ban_repeated_ngrams(history, logits, no_repeat_ngram_size)   # generated tokens only
        logprob = torch.log(torch.softmax(logits, dim=-1))           # as gpt2_beam.py lines 278 and 284
        if i == 0:
            next_scores = logprob                                    # (B, V)
        else:
            next_scores = (beam_scores[:, :, None] + logprob.view(B, K, V)).view(B, K * V)
        beam_scores, flat = torch.topk(next_scores, K, dim=1, largest=True, sorted=True)   # (B, K)
        if torch.isnan(beam_scores).any():                           # topk ranks NaN first: NaN logits end here
            raise ValueError(f"beam search: NaN in the model's log-probabilities at step {i}")
        if i == 0:                                                   # all K slots come from the one live beam
            src_rows = torch.arange(B, device=device).repeat_interleave(K)
        else:
            src_rows = (flat // V + base[:, None]).view(-1)          # (B*K,) rows of the previous step
        token = (flat % V).view(-1)                                  # (B*K,)
        past.reorder_cache(src_rows)                                 # step 0: expands B rows to B*K
        history = torch.cat([history[src_rows], token[:, None]], 1)     # (B*K, i+1)

        flat_scores = beam_scores.view(-1)
        is_eos = torch.isin(token, eos)
        if is_eos.any():
            _offer(best_score, has_best, best_seq, best_len,
                   (flat_scores / float((i + 1) ** length_penalty)).double(), is_eos, history, K)
            flat_scores = flat_scores.masked_fill(is_eos, float("-inf"))
            beam_scores = flat_scores.view(B, K)

    everyone = torch.ones(B * K, dtype=torch.bool, device=device)
    _offer(best_score, has_best, best_seq, best_len,
           (beam_scores.view(-1) / float(history.shape[1] ** length_penalty)).double(), everyone, history, K)
    return [best_seq[b, :best_len[b]].tolist() for b in range(B)]


def authors_beam_search(model, contexts: list[list[int]], *, num_beams: int, length_penalty: float,
                        no_repeat_ngram_size: int, max_new_tokens: int, eos_ids, batch_size: int) -> list[list[int]]:
    """Generated token ids per context, as gpt2_beam.py's `beam()` would choose them, cut before the first EOS.

    model: a transformers (5.x) GPT2LMHeadModel, or any causal LM taking attention_mask, position_ids and `cache`
    and returning a reorderable Cache. contexts: token ids; the authors' query is the MR's tokens then 50256
    (gpt2_encode.py lines 57-58, `--add_bos`). eos_ids: the EOS set; the authors' is {50256, 628}
    (`--eos_token_id 628` appended to the default [50256], gpt2_beam.py line 77). Outputs do not depend on
    batch_size (speed and memory only). The returned ids stop before the first EOS id. gpt2_decode.py (line 131)
    then cuts the decoded text at "<|endoftext|>" and "\\n\\n" and strips it: decode without skipping special
    tokens and apply stages.lib.authors_data.cut_like_gpt2_decode (a "\\n\\n" may also come from other tokens).
    """
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("num_beams, max_new_tokens and batch_size must be >= 1")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("empty context")
    eos_set = set(int(e) for e in eos_ids)
    model.eval()
    results = []
    for start in range(0, len(contexts), batch_size):
        batch = [list(c) for c in contexts[start:start + batch_size]]
        for seq in _search_batch(model, batch, num_beams, float(length_penalty), int(no_repeat_ngram_size),
                                 max_new_tokens, eos_set):
            cut = next((j for j, t in enumerate(seq) if t in eos_set), len(seq))
            results.append(seq[:cut])
    return results
