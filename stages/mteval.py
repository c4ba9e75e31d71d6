"""BLEU and NIST exactly as the E2E scorer gets them from NIST mteval-v13a(-sig).pl in its default (Perl) mode.

measure_scores.py writes the references as one SGML document per reference position (sysid ref_0, ref_1, ...; plain
"ref" when every instance has a single reference), padding instances that have fewer references with empty segments,
writes segments without escaping, and calls mteval with no options: lowercasing on, closest reference length,
smoothed BLEU. The padding is why NIST differs from the scorer's `-p` Python mode: NIST's length penalty divides the
references' total length by the number of reference documents, empty ones included.
"""
from __future__ import annotations

import math
import re
from collections import Counter

# Perl's \s on a UTF-8 decoded string (Python's \s adds \x1c-\x1f).
_WS = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+"
_WS_RE = re.compile(_WS)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# mteval-v13a `tokenization` (the default, non-international one), in its order.
_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([\.,])")
_PERIOD_COMMA_BEFORE = re.compile(r"([\.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_BLEU_N, _NIST_N = 4, 5


def tokenize(text: str) -> list[str]:
    """Words of one segment as mteval-v13a sees them (entities decoded, ASCII-lowercased, punctuation split)."""
    t = text.replace("<skipped>", "")
    # The SGML files are written unescaped, so these entities in the raw text are decoded, in mteval's order.
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        t = t.replace(entity, char)
    t = f" {t} ".translate(_ASCII_LOWER)  # tr/[A-Z]/[a-z]/: ASCII only
    t = _PUNCT.sub(r" \1 ", t)
    t = _PERIOD_COMMA_AFTER.sub(r"\1 \2 ", t)
    t = _PERIOD_COMMA_BEFORE.sub(r" \1 \2", t)
    t = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", t)
    return [w for w in _WS_RE.split(t) if w]


def _ngrams(words: list[str], max_n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _reference_documents(refs: list[list[str]]) -> list[list[str]]:
    """Per instance, its references in the order mteval reads the documents: sorted sysids, empty padding included."""
    width = max(len(r) for r in refs)
    # measure_scores.py names them ref_0..ref_{k-1} (or "ref"); mteval visits `sort keys`, i.e. string order.
    order = sorted(range(width), key=lambda j: f"ref_{j}")
    return [[r[j] if j < len(r) else "" for j in order] for r in refs]


def _information_weights(ref_counts: list[Counter], total_words: int) -> dict[tuple, float]:
    """NIST info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over all reference segments (compute_ngram_info)."""
    totals: Counter = Counter()
    for c in ref_counts:
        totals.update(c)
    info = {}
    for ngram, count in totals.items():
        prefix = ngram[:-1]
        # Perl tests the prefix string for truth: a prefix that is exactly "0" counts as no prefix.
        denom = totals[prefix] if prefix and prefix != ("0",) else total_words
        info[ngram] = -math.log(count / denom) / math.log(2)
    return info


def _closest_length(ref_lengths: list[int], hyp_length: int) -> int:
    """mteval-v13a brevity_penalty_closest folded over the references: ties go to the shorter, empty ones skipped."""
    best = ref_lengths[0]
    for length in ref_lengths[1:]:
        if not length:
            continue
        if abs(hyp_length - length) < abs(hyp_length - best) or (
                abs(hyp_length - length) == abs(hyp_length - best) and length < best):
            best = length
    return best


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) / math.log(1.5)
    return math.exp(-beta * math.log(ratio) ** 2)


def bleu_nist(refs: list[list[str]], hyps: list[str]) -> tuple[float, float]:
    """System-level (BLEU, NIST) of mteval-v13a for one test document against multi-reference documents."""
    docs = [[tokenize(r) for r in inst] for inst in _reference_documents(refs)]
    n_docs = len(docs[0])
    ref_counts = [_ngrams(r, _NIST_N) for inst in docs for r in inst]
    total_ref_words = sum(len(r) for inst in docs for r in inst)
    info = _information_weights(ref_counts, total_ref_words)

    ref_length = 0
    match = [0] * (_NIST_N + 1)
    hyp_count = [0] * (_NIST_N + 1)
    hyp_info = [0.0] * (_NIST_N + 1)
    counts = iter(ref_counts)
    for inst, hyp in zip(docs, hyps):
        words = tokenize(hyp)
        max_ref: dict[tuple, int] = {}
        for _ in inst:
            for ngram, c in next(counts).items():
                if c > max_ref.get(ngram, 0):
                    max_ref[ngram] = c
        ref_length += _closest_length([len(r) for r in inst], len(words))
        for n in range(1, _NIST_N + 1):
            hyp_count[n] += max(len(words) - n + 1, 0)
        for ngram, c in _ngrams(words, _NIST_N).items():
            if ngram in max_ref:
                clipped = min(c, max_ref[ngram])
                match[len(ngram)] += clipped
                hyp_info[len(ngram)] += info[ngram] * clipped
    return _bleu(ref_length, match, hyp_count), _nist(n_docs, total_ref_words, hyp_count, hyp_info)


def _bleu(ref_length: int, match: list[int], hyp_count: list[int]) -> float:
    """mteval-v13a bleu_score (smoothed by default): a zero match count at order n counts as 1/(2^k * hyp_count)."""
    brevity = math.exp(min(0.0, 1 - ref_length / hyp_count[1])) if hyp_count[1] > 0 else 0.0
    log_sum, smooth = 0.0, 1
    for n in range(1, _BLEU_N + 1):
        if hyp_count[n] == 0:
            continue  # iscore = 0
        if match[n] == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * hyp_count[n]))
        else:
            log_sum += math.log(match[n] / hyp_count[n])
    return math.exp(log_sum / _BLEU_N) * brevity


def _nist(n_docs: int, total_ref_words: int, hyp_count: list[int], hyp_info: list[float]) -> float:
    """mteval-v13a nist_score: information per n-gram, penalised by hypothesis vs average reference-document length."""
    score = sum(hyp_info[n] / max(hyp_count[n], 1) for n in range(1, _NIST_N + 1))
    return score * _nist_length_penalty(hyp_count[1] / (total_ref_words / n_docs))
