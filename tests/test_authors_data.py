"""stages.lib.authors_data: the LoRA authors' `MR||reference` E2E files, read as format_converting_e2e.py and
gpt2_decode.py read them; blob-id verification; the shipped sample data/sample/."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from stages.lib.authors_data import (AuthorsDataError, cut_like_gpt2_decode, group_references, parse_authors_text,
                                     read_authors_file)
from stages.lib.e2e import DataError, group_by_mr, parse_mr, read_e2e_csv

from conftest import ROOT, SAMPLE

SHARED = ROOT.parent / "shared"
AUTHORS_SAMPLE = ROOT / "data" / "sample"
need_shared = pytest.mark.skipif(not (SHARED / "e2e-authors").is_dir(), reason="../shared/e2e-authors not here")


# --- the format, as the authors' scripts read it ---

def test_line_is_split_at_the_separator_and_stripped_like_format_converting_e2e():
    text = "  name : A | Type : pub||A is a pub . \nname : B  ||B is near A . \t\n"
    assert parse_authors_text(text, "x.txt") == [
        ("name : A | Type : pub", "A is a pub ."),       # line.strip(): both ends of the line
        ("name : B  ", "B is near A ."),                # the MR keeps its own trailing spaces, as items[0] does
    ]


def test_newlines_are_read_like_python_text_mode():
    assert parse_authors_text("name : a||b\r\nname : c||d\rname : e||f", "x.txt") == [
        ("name : a", "b"), ("name : c", "d"), ("name : e", "f")]


def test_references_grouped_by_exact_context_in_order_of_first_appearance():
    rows = [("m2", "r1"), ("m1", "r2"), ("m2", "r3"), ("m2 ", "r4"), ("m1", "r5 <|endoftext|> tail")]
    assert group_references(rows) == [("m2", ["r1", "r3"]), ("m1", ["r2", "r5"]), ("m2 ", ["r4"])]


def test_cut_like_gpt2_decode():
    assert cut_like_gpt2_decode(" A pub .<|endoftext|>junk") == "A pub ."
    assert cut_like_gpt2_decode("A pub .\n\nB<|endoftext|>") == "A pub ."
    assert cut_like_gpt2_decode("A\npub .\n") == "A\npub ."       # a single newline is not a cut
    assert cut_like_gpt2_decode("<|endoftext|>A") == ""


# --- bad input: one error naming file and line, an exit-2 DataError ---

@pytest.mark.parametrize("content, line, what", [
    (b"name : a||b\nno separator here\n", 2, "no '||'"),
    (b"name : a||b\n\nname : c||d\n", 2, "no '||'"),      # a blank line in the middle
    (b"||b\n", 1, "empty MR"),
    (b"   ||b\n", 1, "empty MR"),
    (b"name : a||b\nname : c||   \n", 2, "empty reference"),
    (b"name : a||b||c\n", 1, "more than one '||'"),
    (b"name : a||b\nname : c||d\xff\n", 2, "not UTF-8"),
    (b"name : a||b\r\nname : c\xe9||d\r\n", 2, "not UTF-8"),
])
def test_bad_lines_name_file_and_line(tmp_path, content, line, what):
    path = tmp_path / "test.txt"
    path.write_bytes(content)
    with pytest.raises(AuthorsDataError, match=rf"^{re.escape(str(path))}: line {line}: .*{re.escape(what)}"):
        read_authors_file(path)
    assert issubclass(AuthorsDataError, DataError)


@pytest.mark.parametrize("mr, what", [
    ("name : Aromi | food : [Italian", "a bracket"),                 # unbalanced brackets
    ("name : Aromi] | food : Italian", "a bracket"),
    ("name : Aromi | name : Zizzi", "'name' appears twice"),        # duplicate slots
    ("name : Aro\x00mi | food : Italian", "control character U+0000"),  # a NUL byte
    ("name : Aromi |\tfood : Italian", "control character U+0009"),
    ("name : Aromi | food : ", "empty value for 'food'"),
    ("name : Aromi |  : Italian", "empty key"),
    ("name : Aromi | | food : Italian", "an empty slot"),
    ("| name : Aromi | food : Italian", "an empty slot"),
    ("name : Aromi | food Italian", "expected 'key : value'"),
    ("name : Aromi | food : Italian : cheap", "more than one ':'"),
    ("name : Aromi | f00d : Italian", "key 'f00d' is not letters and spaces"),
    ("name[Aromi], food[Italian]", "a bracket"),                    # the official spelling is not this format's
])
def test_malformed_mrs_name_file_and_line_under_the_official_csvs_grammar(tmp_path, mr, what):
    """The same slot rules as stages/lib/e2e.parse_mr: before, each of these passed and generate failed at the end."""
    path = tmp_path / "test.txt"
    path.write_text(f"name : Zizzi | food : Italian||Zizzi is nice .\n{mr}||Aromi is nice .\n", encoding="utf-8")
    with pytest.raises(AuthorsDataError, match=rf"^{re.escape(str(path))}: line 2: malformed MR .*{re.escape(what)}"):
        read_authors_file(path)


def test_well_formed_mrs_keep_their_spacing_as_the_context():
    """The grammar checks the MR; the context stays byte for byte what format_converting_e2e.py keeps."""
    text = "name : The Eagle|Type : pub  |  family friendly : no  ||The Eagle is a pub .\n"
    assert parse_authors_text(text, "x.txt") == [("name : The Eagle|Type : pub  |  family friendly : no  ",
                                                   "The Eagle is a pub .")]


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(AuthorsDataError, match="empty.txt: no lines"):
        read_authors_file(tmp_path / "empty.txt")
    with pytest.raises(AuthorsDataError, match="nope.txt: no such file"):
        read_authors_file(tmp_path / "nope.txt")
    good = tmp_path / "valid.txt"
    good.write_bytes(b"name : a||b \n")
    assert read_authors_file(good) == [("name : a", "b")]


# --- the shipped sample: same rows as data/sample/, in the authors' text ---

@pytest.mark.parametrize("name, csv_name", [("train.txt", "trainset.csv"), ("valid.txt", "devset.csv"),
                                            ("test.txt", "testset_w_refs.csv")])
def test_sample_matches_the_csv_sample_row_for_row(name, csv_name):
    rows = read_authors_file(AUTHORS_SAMPLE / name)
    official = read_e2e_csv(SAMPLE / csv_name)
    assert len(rows) == len(official)
    assert len(group_references(rows)) == len(group_by_mr(official))
    for (_, comp), (_, ref) in zip(rows, official):       # same sentence, up to the authors' tokenisation
        assert re.sub(r"\W", "", comp) == re.sub(r"\W", "", ref)


def test_sample_has_a_readme_with_provenance_and_licence():
    text = (AUTHORS_SAMPLE / "README.md").read_text(encoding="utf-8")
    commit = re.search(r"microsoft/LoRA/([0-9a-f]{40})/", (ROOT / "data" / "upstream.yaml").read_text()).group(1)
    assert commit in text and "CC BY-SA 4.0" in text and "make_sample_authors.py" in text


# --- the authors' real files, where ../shared has them ---

@need_shared
@pytest.mark.parametrize("name, csv_name, n_rows, n_mrs", [("valid.txt", "devset.csv", 4672, 547),
                                                            ("test.txt", "testset_w_refs.csv", 4693, 630)])
def test_shared_files_verify_and_group_like_the_official_csvs(name, csv_name, n_rows, n_mrs):
    rows = read_authors_file(SHARED / "e2e-authors" / name)  # its blob id: test_download's check of the pins
    official = read_e2e_csv(SHARED / "e2e" / csv_name)
    assert len(rows) == len(official) == n_rows
    assert len(group_references(rows)) == len(group_by_mr(official)) == n_mrs


@need_shared
def test_sample_script_reproduces_the_shipped_sample(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_authors.py"), str(SHARED), str(SAMPLE),
                    str(tmp_path)], check=True, capture_output=True, cwd=ROOT, env=env)
    for name in ("train.txt", "valid.txt", "test.txt"):
        assert (tmp_path / name).read_bytes() == (AUTHORS_SAMPLE / name).read_bytes()


@pytest.mark.parametrize("name, csv_name", [("train.txt", "trainset.csv"), ("valid.txt", "devset.csv"),
                                            ("test.txt", "testset_w_refs.csv")])
def test_sample_mrs_parse_to_the_official_csvs_slots_row_for_row(name, csv_name):
    from stages.lib.fidelity import mr_slots
    rows, official = read_authors_file(AUTHORS_SAMPLE / name), read_e2e_csv(SAMPLE / csv_name)
    assert len(rows) == len(official)
    for (mr, _), (official_mr, _) in zip(rows, official):
        assert dict(mr_slots(mr)) == dict(parse_mr(official_mr))


@need_shared
def test_all_9365_real_lines_pass_the_grammar_and_give_the_official_slots():
    """Every line of the authors' valid.txt and test.txt passes the MR grammar, and its slots (authors' keys and
    tokenised values mapped back by fidelity.mr_slots) are exactly those of the official CSV's MR on that row."""
    from stages.lib.e2e import parse_authors_mr
    from stages.lib.fidelity import mr_slots
    lines = 0
    for name, csv_name in (("valid.txt", "devset.csv"), ("test.txt", "testset_w_refs.csv")):
        rows = read_authors_file(SHARED / "e2e-authors" / name)
        official = read_e2e_csv(SHARED / "e2e" / csv_name)
        assert len(rows) == len(official)
        for (mr, _), (official_mr, _) in zip(rows, official):
            assert parse_authors_mr(mr) and dict(mr_slots(mr)) == dict(parse_mr(official_mr)), mr
        lines += len(rows)
    assert lines == 9365
