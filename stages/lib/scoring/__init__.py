"""The five metrics of the E2E NLG Challenge scorer (e2e-metrics measure_scores.py), without Perl and with one JVM.

One concern per module, imported in this order (no module imports this package's `score`):
    ptb.py        PTB tokenization as pycocoevalcap does it (for METEOR, ROUGE-L, CIDEr)
    mteval.py     BLEU and NIST, Perl mode (mteval-v13a-sig.pl) and Python mode (pymteval.py)
    paraphrase.py METEOR's paraphrase table filtered to the input (cached index)
    meteor.py     the METEOR 1.5 JVM
    coco.py       ROUGE-L and CIDEr (pycocoevalcap)
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from stages.lib.e2e import DataError
from stages.lib.scoring import coco, mteval
from stages.lib.scoring.meteor import JavaError, Meteor
from stages.lib.scoring.ptb import coco_tokenize

__all__ = ["METRICS", "MODES", "DataError", "JavaError", "ScoreError", "score"]
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
# measure_scores.py's MT-Eval modes: "perl" is its default (mteval-v13a-sig.pl), "python" its -p (pymteval.py).
MODES = {"perl": mteval.bleu_nist, "python": mteval.bleu_nist_python}


class ScoreError(RuntimeError):
    """A metric cannot be computed (the official scorer would fail too) or came out non-finite."""


def score(refs: list[list[str]], preds: list[str], mode: str = "perl",
          meteor_timeout: float = 300.0) -> dict[str, float]:
    """BLEU, NIST, METEOR, ROUGE-L and CIDEr of `preds` against `refs` (one list of references per prediction), equal
    to the official E2E scorer's values in `mode` ("perl" or "python"); BLEU, METEOR and ROUGE-L are fractions."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if len(preds) != len(refs):
        raise DataError(f"{len(preds)} predictions but {len(refs)} reference instances")
    if not refs or any(not r for r in refs):
        raise DataError("every instance needs at least one reference")
    meteor_run = Meteor()  # the only JVM: it boots and loads WordNet while Python tokenizes
    # METEOR's Python side (filtering its paraphrase table, then feeding the JVM) runs in a worker thread while this
    # one computes the other metrics.
    pool = ThreadPoolExecutor(1, thread_name_prefix="meteor")
    try:
        tok_refs = [[coco_tokenize(r) for r in inst] for inst in refs]
        tok_preds = [coco_tokenize(p) for p in preds]
        meteor_future = pool.submit(meteor_run.run, tok_refs, tok_preds, meteor_timeout)
        try:
            bleu, nist = MODES[mode](refs, preds)
        except ZeroDivisionError as e:
            raise ScoreError(f"{mode} mode: {e}") from None
        rouge_l, cider = coco.rouge_l_cider(tok_refs, tok_preds)
        result = {"bleu": bleu, "nist": nist, "meteor": meteor_future.result().score, "rouge_l": rouge_l,
                  "cider": cider}
    finally:
        meteor_run.close()  # kills the JVM if still running, so the worker cannot wait on it
        pool.shutdown(wait=True, cancel_futures=True)
    bad = {k: v for k, v in result.items() if not math.isfinite(v)}
    if bad:
        raise ScoreError(f"non-finite metric(s) {bad}: refusing to report them")
    return result
