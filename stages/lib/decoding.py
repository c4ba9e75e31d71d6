"""What the three searches (stages/lib/beam.py, stages/lib/li_liang_beam.py, transformers' in stages/generate.py)
share: left padding, and the ban on repeating an n-gram of the generated text."""
from __future__ import annotations

import torch


def left_pad(contexts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, width) on the CPU: every context ends at column width - 1 (GPT-2 continues from the
    right end), pads masked. Position ids must then follow the mask, so a padded context decodes as if alone."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(contexts), width, dtype=torch.long)
    for b, c in enumerate(contexts):
        ids[b, width - len(c):] = torch.tensor(c, dtype=torch.long)
        mask[b, width - len(c):] = 1
    return ids, mask


def ban_repeated_ngrams(history: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """`scores` (hyps, vocab) with -inf for every token that would repeat an n-gram of `history` (hyps, L): each
    window of n tokens whose first n - 1 equal the last n - 1 bans its n-th token, as gpt2_beam.py's
    `_calc_banned_ngram_tokens` (lines 96-122) and transformers' NoRepeatNGramLogitsProcessor ban them
    (tests/test_speed.py compares them). No host sync, no Python loop: the latter copies each hypothesis to the
    host every step (160 copies per step at 16 MRs x 10 beams)."""
    hyps, length = history.shape
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if length < n:  # no complete n-gram yet
        return scores
    windows = history.unfold(1, n, 1)  # (hyps, L - n + 1, n)
    if n == 1:  # unigram ban: every token seen so far
        match = torch.ones(windows.shape[:2], dtype=torch.bool, device=history.device)
    else:
        tail = history[:, length - n + 1:]  # (hyps, n - 1): what the next token would continue
        match = (windows[:, :, :-1] == tail[:, None, :]).all(-1)  # (hyps, L - n + 1)
    hits = torch.zeros_like(scores).scatter_add_(1, windows[:, :, -1], match.to(scores.dtype))  # (hyps, vocab)
    return scores.masked_fill(hits > 0, float("-inf"))
