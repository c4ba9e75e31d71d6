"""MR fidelity (stages/lib/fidelity.py): an approximate slot matcher, specified on hand-made cases and on the
sample's own human references."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stages.lib.e2e import group_by_mr, parse_mr, read_e2e_csv
from stages.lib.fidelity import KEYS, fidelity, realised
from stages.tools.fidelity import main

ROOT = Path(__file__).resolve().parents[1]
MR = "name[The Eagle], eatType[coffee shop], food[French], area[riverside], familyFriendly[yes], near[Café Rouge]"


# Invariants

def test_returns_exactly_the_documented_keys_as_finite_numbers():
    out = fidelity([MR, MR], ["The Eagle is a coffee shop.", "Nothing."])
    assert set(out) == set(KEYS)
    assert isinstance(out["distinct_outputs"], int)
    assert all(0.0 <= out[k] <= 1.0 for k in ("name_realised", "slots_realised"))


def test_one_sentence_for_every_mr_counts_one_distinct_output():
    mrs = ["name[The Eagle], food[French]", "name[Zizzi], food[Indian]", "name[Aromi], food[English]"]
    assert fidelity(mrs, ["The Eagle serves French food."] * 3)["distinct_outputs"] == 1
    assert fidelity(mrs, [" The Eagle. ", "The Eagle.", "Zizzi."])["distinct_outputs"] == 2  # trimmed


def test_name_share_counts_mrs_whose_output_holds_their_own_name():
    mrs = ["name[The Eagle], food[French]", "name[Zizzi], food[Indian]", "name[Aromi]", "name[Cotto]"]
    outs = ["The Eagle serves French food.", "The Eagle serves Indian food.", "aromi!", "Cotto and more"]
    result = fidelity(mrs, outs)
    assert result["name_realised"] == 3 / 4  # the second output names the wrong restaurant
    assert result["slots_realised"] == 5 / 6  # 4 names (3 right) + 2 foods (both right)


def test_a_full_realisation_scores_one_and_an_empty_output_zero():
    full = ("The Eagle is a family-friendly coffee shop by the riverside near Cafe Rouge serving French food.")
    assert fidelity([MR], [full]) == {"distinct_outputs": 1, "name_realised": 1.0, "slots_realised": 1.0}
    assert fidelity([MR], [""]) == {"distinct_outputs": 1, "name_realised": 0.0, "slots_realised": 0.0}


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="1 outputs for 2 MRs"):
        fidelity([MR, MR], ["x"])
    with pytest.raises(ValueError, match="no MRs"):
        fidelity([], [])
    with pytest.raises(ValueError, match="malformed MR"):
        fidelity(["name The Eagle"], ["x"])


# The matcher, slot by slot

@pytest.mark.parametrize("key, value, yes, no", [
    ("name", "The Eagle", "the eagle is nice", "An eagle is nice"),
    ("near", "Café Rouge", "near CAFE ROUGE.", "near Rouge"),
    ("eatType", "coffee shop", "a coffee-shop", "a pub"),
    ("eatType", "pub", "It is a pub.", "It is a publisher."),
    ("food", "English", "serves British food", "serves French food"),
    ("food", "Fast food", "fast-food place", "quick food"),
    ("area", "city centre", "in the city center", "by the river"),
    ("area", "riverside", "by the river", "in the centre"),
    ("priceRange", "cheap", "inexpensive meals", "expensive meals"),
    ("priceRange", "less than £20", "under £20", "over £30"),
    ("priceRange", "£20-25", "costs £20-£25", "costs £20"),
    ("priceRange", "more than £30", "more than £30 a head", "less than £20"),
    ("priceRange", "high", "prices are high", "prices are low"),
    ("customer rating", "5 out of 5", "rated five stars", "rated 3 out of 5"),
    ("customer rating", "1 out of 5", "a 1 out of 5 rating", "a 5 out of 5 rating"),
    ("customer rating", "low", "a low customer rating", "a high customer rating"),
    ("customer rating", "average", "rated average", "rated highly"),
    ("familyFriendly", "yes", "it is kid friendly", "it is not kid friendly"),
    ("familyFriendly", "no", "it isn't family-friendly", "it is family-friendly"),
    ("familyFriendly", "no", "adults only", "families welcome"),
])
def test_each_slot_value_has_a_realisation_and_a_miss(key, value, yes, no):
    assert realised(key, value, yes)
    assert not realised(key, value, no)


def test_an_unknown_slot_value_must_appear_verbatim():
    assert realised("music", "Jazz Age", "plays jazz age tunes")
    assert not realised("music", "Jazz Age", "plays jazz")


# Calibration on real text: the sample's human references

def test_human_references_realise_most_slots_and_far_more_than_shuffled_ones():
    groups = group_by_mr(read_e2e_csv(ROOT / "data" / "sample" / "testset_w_refs.csv"))
    mrs, refs = [mr for mr, _ in groups], [refs[0] for _, refs in groups]
    own = fidelity(mrs, refs)
    shuffled = fidelity(mrs, refs[7:] + refs[:7])  # each MR gets another MR's reference
    assert own["name_realised"] == 1.0
    assert own["slots_realised"] > 0.85  # E2E references themselves omit some slots (the cleaning work's point)
    assert shuffled["slots_realised"] < own["slots_realised"] - 0.25
    assert all(parse_mr(mr) for mr in mrs)


def test_cli_prints_sorted_json_per_predictions_file(tmp_path, capsys):
    refs = tmp_path / "test.csv"
    refs.write_text('mr,ref\n"name[Aromi], food[French]",Aromi serves French food.\n'
                    '"name[Cotto]",Cotto.\n"name[Cotto]",Cotto it is.\n')
    pred = tmp_path / "p.txt"
    pred.write_text("Aromi is French.\nNo name.\n")
    main(["--refs", str(refs), "--predictions", str(pred)])
    out = json.loads(capsys.readouterr().out)
    assert out == {str(pred): {"distinct_outputs": 2, "name_realised": 0.5, "slots_realised": 2 / 3}}


def test_cli_names_the_file_when_line_counts_differ(tmp_path):
    refs = tmp_path / "test.csv"
    refs.write_text('mr,ref\n"name[Aromi]",Aromi.\n"name[Cotto]",Cotto.\n')
    pred = tmp_path / "p.txt"
    pred.write_text("Aromi.\n")
    with pytest.raises(Exception, match=r"p\.txt: 1 outputs for 2 MRs"):
        main(["--refs", str(refs), "--predictions", str(pred)])


def test_authors_mr_syntax_gives_the_official_slots():
    """The authors' text re-serialises MRs; fidelity reads both, with the same slot keys and values."""
    from stages.lib.fidelity import mr_slots as slots
    official = "name[Cotto], eatType[coffee shop], priceRange[£20-25], familyFriendly[yes], customer rating[low]"
    authors = "name : Cotto | Type : coffee shop | price : £ 20 - 25 | family friendly : yes | customer rating : low"
    assert slots(authors) == slots(official)
    with pytest.raises(ValueError, match="malformed MR"):
        slots("name : Cotto | Type coffee shop")


# One MR grammar (stages/lib/e2e.py) for both spellings, and a check generate makes before decoding

@pytest.mark.parametrize("mr, what", [
    ("name : Cotto | name : Aromi", "'name' appears twice"),
    ("name : Cotto | food : [French", "a bracket"),
    ("name : Co\x00tto", "control character U+0000"),
    ("name : Cotto | | food : French", "an empty slot"),
    ("name : Cotto | food : French : cheap", "more than one ':'"),
    ("name[Co\x00tto]", "control character U+0000"),
])
def test_mr_slots_reads_both_spellings_by_the_one_strict_grammar(mr, what):
    from stages.lib.fidelity import mr_slots
    with pytest.raises(ValueError, match=rf"malformed MR .*{re.escape(what)}"):
        mr_slots(mr)


def test_check_mrs_names_the_first_bad_mr_and_accepts_what_fidelity_reads():
    from stages.lib.e2e import DataError
    from stages.lib.fidelity import check_mrs
    good = [MR, "name : Cotto | Type : coffee shop | price : £ 20 - 25"]
    assert check_mrs(good) is None
    assert fidelity(good, ["x", "y"])  # what check_mrs accepts, fidelity() reads
    with pytest.raises(DataError, match=r"^data/prepared/test: MR 3: malformed MR 'name : A \| name : B': "
                                        r"'name' appears twice$"):
        check_mrs([*good, "name : A | name : B", "name[x"], source="data/prepared/test")
    with pytest.raises(DataError, match=r"^MRs: no MRs$"):
        check_mrs([])
