"""ROUGE-L and CIDEr of PTB-tokenized texts, computed by pycocoevalcap as e2e-metrics measure_scores.py gets them
(run_coco_eval, l. 309-325: COCOEvalCap on one image per instance). The inputs are what coco_tokenize() returns."""
from __future__ import annotations

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge


def rouge_l_cider(tok_refs: list[list[str]], tok_hyps: list[str]) -> tuple[float, float]:
    """Corpus ROUGE-L (mean of per-instance F, beta 1.2) and CIDEr (CIDEr-D with document frequencies of the refs)."""
    gts = dict(enumerate(tok_refs))
    res = {i: [h] for i, h in enumerate(tok_hyps)}
    return float(Rouge().compute_score(gts, res)[0]), float(Cider().compute_score(gts, res)[0])
