"""preprocess: the training format, the masks that decide what is learned, the test set by MR, bad input."""
from __future__ import annotations

import hashlib
import json

import datasets
import pytest

from conftest import TOKENIZER, write_csv
from stages.lib import authors_data
from stages.lib import params as P
from stages import preprocess
from stages.lib.e2e import DataError, group_by_mr, read_e2e_csv
from stages.lib.gpt2 import EOS, collate, load_tokenizer
from stages.lib.params import ParamError
from stages.lib.protocols import PROTOCOLS

MR = "name[The Eagle], eatType[coffee shop], food[French]"
REF = "The Eagle is a French coffee shop."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def encode_example(tok, mr, ref, fmt):
    batch = preprocess.encode_batch({"mr": [mr], "ref": [ref]}, tok, fmt)
    return {"input_ids": batch["input_ids"][0], "n_context": batch["n_context"][0]}


def test_paper_format_is_mr_separator_completion_eos(tok):
    ex = encode_example(tok, MR, REF, "paper")
    ids, c = ex["input_ids"], ex["n_context"]
    assert ids[:c] == tok.encode(MR) + [EOS]  # gpt2_encode.py --add_bos: the separator follows the context
    assert ids[c:] == tok.encode(" " + REF) + [EOS]
    assert tok.decode(ids[c:-1]) == " " + REF


def test_equals_format(tok):
    ex = encode_example(tok, MR, REF, "equals")
    assert tok.decode(ex["input_ids"][:ex["n_context"]]) == MR + " ="
    assert ex["input_ids"][-1] == EOS


def test_labels_mask_context_and_padding_but_keep_eos(tok):
    short = encode_example(tok, MR, "Cheap.", "paper")
    long = encode_example(tok, MR, REF, "paper")
    batch = collate([short, long])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    n, c = len(short["input_ids"]), short["n_context"]
    assert (labels[0, :c] == -100).all()  # context: not learned
    assert labels[0, c:n].tolist() == short["input_ids"][c:]  # completion learned, EOS included
    assert labels[0, n - 1] == EOS
    assert ids[0, n:].eq(EOS).all() and (labels[0, n:] == -100).all()  # padding is EOS id but never a label
    assert mask[0].sum() == n and mask[1].sum() == len(long["input_ids"])
    # The context's own separator EOS is masked too: only completions are learned.
    assert (labels[1, :long["n_context"]] == -100).all() and labels[1, -1] == EOS


def test_group_by_mr_keeps_first_appearance_order_and_all_refs():
    rows = [("a[1]", "x"), ("b[2]", "y"), ("a[1]", "z"), ("c[3]", "w")]
    assert group_by_mr(rows) == [("a[1]", ["x", "z"]), ("b[2]", ["y"]), ("c[3]", ["w"])]


def base_dir(path, n_positions=1024):
    """What preprocess reads of download-model's output: the tokenizer, and the positions in config.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": n_positions}))
    return path


def run(raw, tmp_path, n_positions=1024):
    base = base_dir(tmp_path / "base", n_positions)
    preprocess.main(["--raw", str(raw), "--base", str(base), "--out", str(tmp_path / "prepared")])
    return tmp_path / "prepared"


def read(path):
    return datasets.load_from_disk(str(path)).to_list()


@pytest.mark.parametrize("protocol", ["authors", "e2e"])
def test_stage_writes_train_validation_and_test_by_mr(params_file, raw_dir, tmp_path, protocol):
    params_file(protocol=protocol)
    out = run(raw_dir, tmp_path)
    read_rows = (lambda name: authors_data.read_authors_file(raw_dir / name)) if protocol == "authors" else (
        lambda name: read_e2e_csv(raw_dir / name))
    names = {split: PROTOCOLS[protocol].raw_name(split) for split in ("train", "test")}
    rows = read_rows(names["train"])
    assert [(t["input_ids"], t["n_context"]) for t in read(out / "paper" / "train")] == [
        tuple(encode_example(load_tokenizer(TOKENIZER), mr, ref, "paper").values()) for mr, ref in rows]
    test = read(out / "paper" / "test")
    groups = (authors_data.group_references if protocol == "authors" else group_by_mr)(read_rows(names["test"]))
    assert [(t["mr"], t["refs"]) for t in test] == groups
    assert all(t["context_ids"][-1] == EOS for t in test)
    # The score stage's references: each MR's on consecutive lines, a blank line between MRs, same order.
    blocks = (out / "test-refs.txt").read_text(encoding="utf-8").rstrip("\n").split("\n\n")
    assert [b.split("\n") for b in blocks] == [refs for _, refs in groups]


def test_both_protocols_hold_the_same_mrs_and_references_up_to_tokenisation(params_file, raw_dir, tmp_path):
    """The authors' text is the official data re-serialised: same MRs in the same order, as many references."""
    tests = {}
    for protocol in ("authors", "e2e"):
        params_file(protocol=protocol)
        tests[protocol] = read(run(raw_dir, tmp_path / protocol) / "paper" / "test")
    assert [len(t["refs"]) for t in tests["authors"]] == [len(t["refs"]) for t in tests["e2e"]]
    assert tests["authors"][0]["mr"].startswith("name : ") and tests["e2e"][0]["mr"].startswith("name[")


def test_stage_output_is_byte_identical_across_runs(params_file, raw_dir, tmp_path):
    def digests(out):
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}
    first = digests(run(raw_dir, tmp_path))
    assert first and digests(run(raw_dir, tmp_path / "again")) == first


@pytest.mark.parametrize("bad, message", [
    ("header", "expected a header with 'mr' and 'ref'"),
    ("empty", "empty split"),
    ("malformed", "malformed MR"),
    ("no-ref", "empty reference"),
])
def test_bad_input_is_an_error_naming_the_file_and_leaves_no_output(params_file, raw_dir, tmp_path, bad, message):
    params_file(protocol="e2e")
    path = raw_dir / "dev.csv"
    if bad == "header":
        write_csv(path, [("a[1]", "x")], header=("meaning", "text"))
    elif bad == "empty":
        write_csv(path, [])
    elif bad == "malformed":
        write_csv(path, [("name[Aromi], food[Italian]", "ok"), ("name[Aromi] food Italian", "bad")])
    else:
        write_csv(path, [("name[Aromi]", "")])
    with pytest.raises(DataError, match=message) as e:
        run(raw_dir, tmp_path)
    assert str(path) in str(e.value)
    if bad == "malformed":
        assert "data row 2" in str(e.value)
    assert not (tmp_path / "prepared").exists()


def test_too_long_example_is_an_error_not_a_truncation(params_file, raw_dir, tmp_path):
    params_file(preprocess__max_length=16)
    with pytest.raises(DataError, match="preprocess.max_length=16"):
        run(raw_dir, tmp_path)
    assert not (tmp_path / "prepared").exists()


def test_too_long_test_mr_is_an_error_in_preprocess(params_file, raw_dir, tmp_path):
    """Caught here, not as an IndexError in generate after training."""
    write_csv(raw_dir / "test.csv", [("name[" + "Very Long Name " * 40 + "]", "x")])
    params_file(preprocess__max_length=100, protocol="e2e")
    with pytest.raises(DataError, match=r"test.csv: test MR 1: \d+ tokens > preprocess.max_length=100"):
        run(raw_dir, tmp_path)
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("key, value", [("preprocess.max_length", 0), ("preprocess.max_length", 8.5)])
def test_bad_params_name_the_parameter(params_file, raw_dir, tmp_path, key, value):
    params_file(**{key.replace(".", "__"): value})
    with pytest.raises(ParamError, match=key):
        run(raw_dir, tmp_path)


def test_max_length_beyond_the_models_positions_is_refused_before_any_work(params_file, raw_dir, tmp_path):
    """A model cannot train or decode past its n_positions: said in preprocess, naming both, not later in train."""
    params_file(preprocess__max_length=512)
    with pytest.raises(ParamError, match=r"preprocess.max_length=512 > the base model's 128 positions \(.*json\)"):
        run(raw_dir, tmp_path, n_positions=128)
    assert not (tmp_path / "prepared").exists()


def test_every_layout_holds_the_same_rows_mrs_and_order(params_file, raw_dir, tmp_path):
    """A recipe picks its layout from one preprocess output: the same examples and test MRs in each, in order."""
    out = run(raw_dir, tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["equals", "li-liang", "paper", "test-refs.txt"]
    for split in ("train", "validation", "test"):
        sizes = {layout: len(read(out / layout / split)) for layout in P.LAYOUTS}
        assert len(set(sizes.values())) == 1, (split, sizes)
    assert read(out / "li-liang" / "test")[0]["mr"] == read(out / "paper" / "test")[0]["mr"]
