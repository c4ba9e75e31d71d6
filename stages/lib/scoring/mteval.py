"""BLEU and NIST exactly as the E2E scorer (e2e-metrics measure_scores.py) computes them, in both of its modes.

Perl mode (the default; `bleu_nist`): the modified NIST mteval-v13a-sig.pl that e2e-metrics ships. measure_scores.py
(create_mteval_file, l. 171-200) writes the references as one SGML document per reference position (sysid ref_0,
ref_1, ...; plain "ref" when every instance has a single reference), padding instances that have fewer references
with empty segments, writes segments without escaping, and calls mteval with no options (l. 276-280): lowercasing on,
closest reference length, smoothed BLEU. The "-sig" modification counts only the non-empty references of each
segment (score_segment, l. 810: `$nrefs++ if ( $ref_seg ne '' )`), and NIST's length penalty compares the output
length with the total reference length divided by that count per segment (score_system, l. 624: `$cum_ref_count /
$cum_seg_count`; nist_score, l. 932), not by the number of padded documents.

Python mode (`-p`; `bleu_nist_python`): e2e-metrics/metrics/pymteval.py, which measure_scores.py run_pymteval
(l. 293-306) feeds with the unpadded references. Its tokenizer is mteval's with Python's whitespace class and full
Unicode lowercasing (of tokens, l. 60), an empty segment is one empty token (l. 113), BLEU smooths zero counts to 1e-15
(l. 199) and NIST's length penalty uses the sum over segments of each one's mean reference length (l. 255).
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
    """NIST's brevity penalty exp(-beta log(ratio)^2), beta such that an output 1.5 times too short keeps half: both
    mteval-v13a and pymteval (l. 210) compute beta as -log(0.5) / log(1.5)^2 (the same float either way)."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-(-math.log(0.5) / math.log(1.5) ** 2) * math.log(ratio) ** 2)


def bleu_nist(refs: list[list[str]], hyps: list[str]) -> tuple[float, float]:
    """System-level (BLEU, NIST) of mteval-v13a for one test document against multi-reference documents."""
    docs = [[tokenize(r) for r in inst] for inst in _reference_documents(refs)]
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
    # mteval-v13a-sig.pl NIST: $nsys = non-empty reference segments / segments (l. 810, 578-579, 624)
    nonempty_refs = sum(1 for inst in docs for r in inst if r)
    return _bleu(ref_length, match, hyp_count), _nist(nonempty_refs / len(docs), total_ref_words, hyp_count,
                                                        hyp_info)


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


def _nist(refs_per_segment: float, total_ref_words: int, hyp_count: list[int], hyp_info: list[float]) -> float:
    """mteval-v13a-sig nist_score (l. 923-937): information per n-gram, penalised by hypothesis length vs the total
    reference length over the mean number of (non-empty) references per segment."""
    score = sum(hyp_info[n] / max(hyp_count[n], 1) for n in range(1, _NIST_N + 1))
    return score * _nist_length_penalty(hyp_count[1] / (total_ref_words / refs_per_segment))


# --- Python mode: e2e-metrics metrics/pymteval.py -------------------------------------------------------------------

_PY_WS = re.compile(r"\s+")  # Python's \s (pymteval l. 110), not Perl's


def py_tokenize(text: str) -> list[str]:
    """pymteval NGramScore.tokenize (l. 92-113): mteval's regexes, no lowercasing here, and "" -> [""] (one token)."""
    t = text.replace("<skipped>", "")
    t = t.replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        t = t.replace(entity, char)
    t = _PUNCT.sub(r" \1 ", f" {t} ")
    t = _PERIOD_COMMA_AFTER.sub(r"\1 \2 ", t)
    t = _PERIOD_COMMA_BEFORE.sub(r" \1 \2", t)
    t = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", t)
    return _PY_WS.sub(" ", t).strip().split(" ")


def _py_ngrams(words: list[str], n: int) -> Counter:
    # pymteval ngrams (l. 59-60): case-insensitive, each token lowercased with Python's str.lower
    low = [w.lower() for w in words]
    return Counter(tuple(low[i:i + n]) for i in range(len(low) - n + 1))


def bleu_nist_python(refs: list[list[str]], hyps: list[str]) -> tuple[float, float]:
    """(BLEU, NIST) as pymteval's BLEUScore and NISTScore accumulate them over (output, references) pairs."""
    hits = [0] * (_NIST_N + 1)  # clipped matches per order, BLEU's and NIST's alike
    cand_lens = [0] * (_NIST_N + 1)  # sum of len - n + 1 per order: negative terms included (l. 154, 237)
    bleu_ref_len = 0
    avg_ref_len = 0.0
    ref_ngrams: Counter = Counter()  # every reference n-gram, all orders; () holds the total reference length
    hit_ngrams: list[tuple[tuple, int]] = []
    for inst, hyp in zip(refs, hyps):
        words = py_tokenize(hyp)
        ref_words = [py_tokenize(r) for r in inst]
        for n in range(1, _NIST_N + 1):
            cand_lens[n] += len(words) - n + 1
            merged: dict[tuple, int] = {}
            for r in ref_words:
                counts = _py_ngrams(r, n)
                ref_ngrams.update(counts)
                for g, c in counts.items():
                    merged[g] = max(merged.get(g, 0), c)
            for g, c in _py_ngrams(words, n).items():
                h = min(c, merged.get(g, 0))
                if h:
                    hits[n] += h
                    hit_ngrams.append((g, h))
        # BLEU: the closest reference length, the shorter on a tie (l. 158)
        bleu_ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        total = sum(len(r) for r in ref_words)
        ref_ngrams[()] += total
        avg_ref_len += total / len(ref_words)  # NIST (l. 255): this segment's mean reference length
    return _py_bleu(bleu_ref_len, hits, cand_lens), _py_nist(ref_ngrams, hit_ngrams, cand_lens, avg_ref_len)


def _py_bleu(ref_len: int, hits: list[int], cand_lens: list[int]) -> float:
    """pymteval BLEUScore.bleu (l. 181-203), smoothing 0: zero counts become 1e-15 hits over 1e-9 n-grams."""
    bp = 1.0
    if cand_lens[1] <= ref_len:
        bp = math.exp(1.0 - ref_len / (float(cand_lens[1]) if cand_lens[1] else 1e-5))
    log_sum = sum(math.log(max(hits[n], 1e-15) / max(cand_lens[n], 1e-9)) for n in range(1, _BLEU_N + 1))
    return bp * math.exp(log_sum / _BLEU_N)


def _py_nist(ref_ngrams: Counter, hit_ngrams: list[tuple[tuple, int]], cand_lens: list[int],
             avg_ref_len: float) -> float:
    """pymteval NISTScore.nist (l. 281-292): info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over reference
    n-grams, with count(()) the total reference length; the length penalty on output length vs avg_ref_len."""
    hit_info = [0.0] * (_NIST_N + 1)
    for g, h in hit_ngrams:
        hit_info[len(g)] += math.log(ref_ngrams[g[:-1]] / ref_ngrams[g], 2) * h
    zero = [n for n in range(1, _NIST_N + 1) if cand_lens[n] == 0]
    if zero:
        # pymteval divides by this count and fails (ZeroDivisionError): there is no official value to give
        raise ZeroDivisionError(f"NIST: the outputs' {zero[0]}-gram count (sum of len - {zero[0] - 1} over outputs) "
                                "is 0, where measure_scores.py -p fails with ZeroDivisionError")
    score = sum(hit_info[n] / cand_lens[n] for n in range(1, _NIST_N + 1))
    return score * _nist_length_penalty(cand_lens[1] / float(avg_ref_len))
