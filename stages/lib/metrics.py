"""The five E2E metrics as the paper's Table 3 prints them: one table for the scorer, the report and compare."""
from __future__ import annotations

# (key in a scores file, title, in % in Table 3): BLEU, METEOR and ROUGE-L in %, NIST and CIDEr as they come.
METRICS = (("bleu", "BLEU", True), ("nist", "NIST", False), ("meteor", "METEOR", True), ("rouge_l", "ROUGE-L", True),
           ("cider", "CIDEr", False))
KEYS = tuple(key for key, _, _ in METRICS)
PERCENT = tuple(key for key, _, percent in METRICS if percent)
