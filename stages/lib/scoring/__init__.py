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
import threading

from stages.lib.cli import InputError
from stages.lib.e2e import DataError
from stages.lib.metrics import KEYS
from stages.lib.scoring import coco, mteval
from stages.lib.scoring.meteor import JavaError, Meteor
from stages.lib.scoring.ptb import coco_tokenize

__all__ = ["METRICS", "MODES", "DataError", "JavaError", "ScoreError", "score"]
METRICS = KEYS  # stages/lib/metrics.py
# measure_scores.py's MT-Eval modes: "perl" is its default (mteval-v13a-sig.pl), "python" its -p (pymteval.py).
MODES = {"perl": mteval.bleu_nist, "python": mteval.bleu_nist_python}


class ScoreError(InputError):
    """A metric cannot be computed from these outputs (the official scorer would fail too) or came out non-finite."""


CLOSE_WAIT_S = 1.5  # how long an exit waits for the cancelled METEOR worker to clean up before leaving it behind


class _Worker(threading.Thread):
    """`fn(*args)` in a daemon thread. Not a ThreadPoolExecutor: the interpreter joins those at exit, so a SIGTERM
    during a 15 s paraphrase-index build waited for the whole build. A daemon thread is left behind at exit (after
    `CLOSE_WAIT_S` for its cleanup: the build polls for cancellation and writes nothing until its last step)."""

    def __init__(self, fn, *args):
        super().__init__(name="meteor", daemon=True)
        self._fn, self._args = fn, args
        self._value = self._error = None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as e:  # noqa: BLE001 - handed to result() in the caller's thread
            self._error = e

    def result(self):
        while self.is_alive():
            self.join(0.1)  # in short waits: a signal handler in this (the main) thread runs between them
        if self._error is not None:
            raise self._error
        return self._value


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
    worker = None
    try:
        tok_refs = [[coco_tokenize(r) for r in inst] for inst in refs]
        tok_preds = [coco_tokenize(p) for p in preds]
        worker = _Worker(meteor_run.run, tok_refs, tok_preds, meteor_timeout)
        try:
            bleu, nist = MODES[mode](refs, preds)
        except ZeroDivisionError as e:
            raise ScoreError(f"{mode} mode: {e}") from None
        rouge_l, cider = coco.rouge_l_cider(tok_refs, tok_preds)
        result = {"bleu": bleu, "nist": nist, "meteor": worker.result().score, "rouge_l": rouge_l,
                  "cider": cider}
    finally:
        meteor_run.close()  # kills the JVM and cancels the table's filtering, so the worker stops within a second
        if worker is not None:
            worker.join(CLOSE_WAIT_S)
    bad = {k: v for k, v in result.items() if not math.isfinite(v)}
    if bad:
        raise ScoreError(f"non-finite metric(s) {bad}: refusing to report them")
    return result
