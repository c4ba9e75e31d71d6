"""MR fidelity: does each output say what its MR says? Approximate, beside the n-gram metrics.

BLEU and friends reward the references' style even when an output ignores its input (issue 11: 57 of 60 outputs
were one sentence). Three numbers say whether a system follows its MRs:

- `distinct_outputs`: how many different outputs it wrote (one per MR);
- `name_realised`: share of MRs with a `name` slot whose output contains the name;
- `slots_realised`: share of all slot values (name included) that the outputs realise.

The slot matcher is a small set of hand-written patterns in the spirit of the slot error rate of the E2E cleaning
work (Dušek, Howcroft and Rieser 2019, "Semantic Noise Matters for Neural Natural Language Generation", whose
script matches each slot value against a list of surface forms). Ours is written from scratch and much smaller:
names and other free-text values must appear verbatim (case and accents ignored); eatType, food, area,
priceRange, customer rating and familyFriendly accept a few common realisations. It is **approximate**: it misses
paraphrases, and a value that appears in a wrong context (e.g. "not family-friendly" is caught, "low prices" for
a low rating is not) still counts. Use it to compare systems on the same MRs, not as an absolute error rate.
The generate stage adds these numbers to every run's scores; stages/tools/fidelity.py computes them for any file.
"""
from __future__ import annotations

import re
import unicodedata

from stages.lib.e2e import DataError, is_official_mr, parse_any_mr

KEYS = ("distinct_outputs", "name_realised", "slots_realised")

_NEG = r"(?:not|n't|no|non|isn't|aren't)[- ](?:\w+[- ]){0,2}"
_FAMILY = r"(?:family|families|kid|kids|child|children)"
# (slot, normalised value) -> regex over the normalised output. Values not listed here must appear verbatim.
_PATTERNS = {
    ("eattype", "coffee shop"): r"coffee[- ]?shop|\bcaf[e]\b|coffee house",
    ("eattype", "pub"): r"\bpubs?\b",
    ("eattype", "restaurant"): r"restaurant",
    ("food", "fast food"): r"fast[- ]food|burgers?|fries",
    ("food", "english"): r"english|british",
    ("area", "city centre"): r"cent(?:re|er)|downtown",
    ("area", "riverside"): r"river",
    ("pricerange", "cheap"): r"cheap|inexpensive|low[- ]?(?:cost|price|priced)|affordabl|budget",
    ("pricerange", "moderate"): r"moderate|average[- ]?pric|mid[- ]?(?:range|price)|reasonabl",
    ("pricerange", "high"): r"expensive|high(?:er)?[- ]?(?:end|cost|price|priced)|pricey|costly|pric\w*[^.]{0,20}\bhigh",
    ("pricerange", "less than £20"): r"(?:less than|under|below|lower than) (?:£ ?)?20|cheap|inexpensive|low[- ]?pric",
    ("pricerange", "£20-25"): r"£ ?20 ?(?:-|to|and) ?(?:£ ?)?25",
    ("pricerange", "more than £30"): r"(?:more than|over|above|higher than) (?:£ ?)?30|expensive|high[- ]?pric",
    ("customer rating", "1 out of 5"): r"\b(?:1|one)(?: out of (?:5|five)|/5| stars?)",
    ("customer rating", "3 out of 5"): r"\b(?:3|three)(?: out of (?:5|five)|/5| stars?)",
    ("customer rating", "5 out of 5"): r"\b(?:5|five)(?: out of (?:5|five)|/5| stars?)",
}
for _v in ("low", "average", "high"):  # the word within a few words of a rating word, either order
    _PATTERNS[("customer rating", _v)] = (rf"\b{_v}(?:ly)?\b[^.]{{0,25}}(?:rat|review|star|score|custom)|"
                                         rf"(?:rat|review|star|score)\w*[^.]{{0,25}}\b{_v}(?:ly)?\b")


def normalise(text: str) -> str:
    """Lower case, accents dropped (Café -> cafe), whitespace folded."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", text.lower()).strip()


def realised(key: str, value: str, output: str) -> bool:
    """Whether `output` (approximately) realises slot `key[value]`."""
    k, v, text = normalise(key), normalise(value), normalise(output)
    if k == "familyfriendly" and v in ("yes", "no"):
        negated = re.search(_NEG + _FAMILY, text) or re.search(r"adults?[- ]?(?:only|oriented)|for adults", text)
        if v == "no":
            return bool(negated)
        return bool(re.search(_FAMILY, text)) and not negated
    pattern = _PATTERNS.get((k, v))
    if pattern is None:
        return v in text
    return re.search(pattern, text) is not None


# The LoRA authors' re-serialised MRs (`name : X | Type : Y | price : £ 20 - 25`): their key names, and values
# whitespace-tokenised around "£" and "-", mapped back to the official slots.
AUTHORS_KEYS = {"Type": "eatType", "price": "priceRange", "family friendly": "familyFriendly"}


def mr_slots(mr: str) -> list[tuple[str, str]]:
    """(key, value) slots of an official MR (`name[X], ...`) or of an authors' one (`name : X | ...`), read by the one
    MR grammar (stages/lib/e2e.py parse_any_mr; ValueError "malformed MR ..."), the authors' keys and values
    mapped to the official ones."""
    slots = parse_any_mr(mr)
    if is_official_mr(mr):
        return slots
    return [(AUTHORS_KEYS.get(key, key), re.sub(r"£ (\d)", r"£\1", value).replace(" - ", "-"))
            for key, value in slots]


def check_mrs(mrs: list[str], source: str = "MRs") -> None:
    """Refuse, before any decoding, MRs that fidelity() could not read afterwards: a DataError (exit 2)
    `<source>: MR <i>: malformed MR '...': <fault>` naming the first bad one (1-based, in the given order), or
    `<source>: no MRs`. Microseconds per MR. The generate stage calls it on its test MRs right after loading them."""
    if len(mrs) == 0:
        raise DataError(f"{source}: no MRs")
    for i, mr in enumerate(mrs, start=1):
        try:
            mr_slots(mr)
        except ValueError as e:
            raise DataError(f"{source}: MR {i}: {e}") from None


def fidelity(mrs: list[str], outputs: list[str]) -> dict:
    """{distinct_outputs, name_realised, slots_realised} for one output per MR (ValueError on bad input)."""
    if len(mrs) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(mrs)} MRs")
    if not mrs:
        raise ValueError("no MRs")
    names = slots = names_hit = slots_hit = 0
    for mr, out in zip(mrs, outputs):
        for key, value in mr_slots(mr):
            hit = realised(key, value, out)
            slots, slots_hit = slots + 1, slots_hit + hit
            if key == "name":
                names, names_hit = names + 1, names_hit + hit
    return {
        "distinct_outputs": len({o.strip() for o in outputs}),
        "name_realised": names_hit / names if names else 0.0,
        "slots_realised": slots_hit / slots,
    }
