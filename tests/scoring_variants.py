"""Edited variants of a system output, as the scorer tests and the official-scorer runs that produced their expected
values both build them: `python tests/scoring_variants.py OUTPUT KIND DEST` writes one (see PROVENANCE.md)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

KINDS = ("original", "lower", "empty", "noise", "crlf", "short")
# Tokens that exercise the tokenizers: a "0" word (Perl's false prefix), entities mteval decodes, non-ASCII
# letters (mteval lowercases ASCII only, pymteval everything), numbers with periods and commas, clitics, dashes.
NOISE = ["0", "0 0", "£20", "&amp;", "&quot;", "café", "ÉCOLE", "U.S.", "--", "'s", "x,y", "3.5", "1,000", "...", "(",
         ")", "5-star", "n't", "Über", "a/b"]


def variant(lines: list[str], kind: str) -> str:
    """The text of a prediction file: `lines` edited as `kind` says (deterministic)."""
    if kind == "original":
        out = lines
    elif kind == "lower":
        out = [line.lower() for line in lines]
    elif kind == "empty":  # every fifth output empty
        out = ["" if i % 5 == 2 else line for i, line in enumerate(lines)]
    elif kind == "crlf":
        return "".join(line + "\r\n" for line in lines)
    elif kind == "short":  # the first half of each output's words: NIST's length penalty applies
        out = [" ".join(line.split()[:max(1, len(line.split()) // 2)]) for line in lines]
    elif kind == "noise":
        rng = random.Random(7)
        out = []
        for line in lines:
            words = []
            for w in line.split():
                r = rng.random()
                if r < 0.08:
                    continue  # dropped
                words.append(w)
                if r > 0.85:
                    words.append(rng.choice(NOISE))
                elif r > 0.80:
                    words.append(w)  # repeated
            if len(words) > 2 and rng.random() < 0.2:
                i = rng.randrange(len(words) - 1)
                words[i], words[i + 1] = words[i + 1], words[i]
            out.append(" ".join(words))
    else:
        raise ValueError(kind)
    return "".join(line + "\n" for line in out)


if __name__ == "__main__":
    src, kind, dest = sys.argv[1:]
    lines = Path(src).read_text(encoding="utf-8").splitlines()
    Path(dest).write_bytes(variant(lines, kind).encode("utf-8"))
