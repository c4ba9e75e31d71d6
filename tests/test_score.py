"""The E2E scorer: agreement with the official scorer's printed values, the Java PTBTokenizer as an oracle for our
Python tokenizer, hand-checked mteval-v13a behaviour, loaders and CLI errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import stages.lib.scoring as scoring
from stages import score as score_cli
from stages.lib import cli
from stages.lib.e2e import DataError
from stages.lib.scoring import meteor as meteor_mod, mteval, paraphrase
from stages.lib.scoring.meteor import JavaError
from stages.lib.scoring.ptb import coco_tokenize
from stages.score import load_predictions, load_refs

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "scoring"
SHARED = ROOT.parent / "shared" / "e2e"
EXPECTED = json.loads((FIX / "expected.json").read_text(encoding="utf-8"))
CASES = {k: v for k, v in EXPECTED.items() if not k.startswith("_")}
PTB_JAR = paraphrase.METEOR_JAR.parents[1] / "tokenizer" / "stanford-corenlp-3.4.1.jar"
# pycocoevalcap's punctuation filter, applied to the Java tokenizer's output in the oracle.
COCO_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java runtime not installed")

EDGE_TEXTS = [
    "The Eagle isn't cheap; it's £30+ and 5-star (rated 5/5). Price: £££. Rating: 3/5!",
    "'The Vaults' is an Italian pub near Rainbow Vegetarian Café.", "ÉCOLE Über naïve ½ € ¥ ¢ a*b",
    "prices from £30.99, 1,000 3:30 p.m. Mr. Smith.", "The U.S. The end", "U.S.", "etc. The", "No. It is",
    "It’s the “best” place – really — yes", "a--b a---b a----b a-----b", "he said...", ". . . ok",
    "gonna gotta wanna lemme gimme gonnas CANNOT", "I'm we're they've you'll he'd O'Brien don't won't y'all",
    "Café Rouge: 50% off, 1st-class, 24/7, 9am-5pm, A&W, a&w, AT&T", "centre.It is", "family-friendly.It", "ab.5",
    '"The Eagle" is "great".', "text \"quoted\"", "  leading and trailing spaces  ", "TAB\there",
    "{x} [y] <z> (555) 123-4567 d'Artagnan '90s rock'n'roll", "£20-£25 £20-25 US$ 20", "",
    "ALIMENTUM IS IN THE CITY CENTRE.", "http://x.com foo@bar.com",
]


def java_ptb(texts: list[str], tmp_path: Path) -> list[str]:
    """The oracle: the real PTBTokenizer jar run as pycocoevalcap runs it, then pycocoevalcap's punctuation filter."""
    src = tmp_path / "ptb-in.txt"
    src.write_text("\n".join(texts), encoding="utf-8")
    out = subprocess.run(["java", "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                          "-lowerCase", str(src)], capture_output=True, check=True).stdout.decode("utf-8")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in COCO_PUNCT) for line in out.split("\n")]


def assert_same_tokens(texts: list[str], tmp_path: Path) -> None:
    expected = java_ptb(texts, tmp_path)
    bad = [(t, coco_tokenize(t), e) for t, e in zip(texts, expected) if coco_tokenize(t) != e]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]}"


# --- agreement with the official scorer ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_cases() -> dict[str, dict[str, float]]:
    def run(case: dict) -> dict[str, float]:
        return scoring.score(load_refs(FIX / case["references"]), load_predictions(FIX / case["predictions"]))
    if shutil.which("java") is None:
        pytest.skip("Java runtime not installed")
    with ThreadPoolExecutor(len(CASES)) as pool:  # one JVM each, started together: METEOR's load dominates
        return dict(zip(CASES, pool.map(run, CASES.values())))


@pytest.mark.parametrize("metric", score_cli.METRICS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_official_scorer_to_4_decimals(official_cases, case, metric):
    assert round(official_cases[case][metric], 4) == CASES[case][metric]


# --- PTB tokenization against the Java oracle ------------------------------------------------------------------------

@needs_java
def test_ptb_tokenizer_matches_java_on_fixtures_and_edge_cases(tmp_path):
    texts = [r for inst in load_refs(FIX / "devel-conc.txt") for r in inst]
    texts += load_predictions(FIX / "baseline-output.txt") + EDGE_TEXTS
    assert_same_tokens(texts, tmp_path)


@needs_java
def test_ptb_tokenizer_matches_java_on_all_shared_e2e_texts(tmp_path):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} absent (developer/CI data only)")
    texts = {r for f in SHARED.glob("*.csv") if f.name != "testset.csv" for inst in load_refs(f) for r in inst}
    texts |= {p for f in (SHARED / "system-outputs").glob("*.txt") for p in load_predictions(f)}
    assert_same_tokens(sorted(texts), tmp_path)


# --- mteval-v13a, hand-checked ---------------------------------------------------------------------------------------

def test_mteval_tokenization_follows_the_perl_regexes():
    # ASCII-only lowercasing; period/comma split unless inside a number; dash split after a digit; ' kept in words.
    assert mteval.tokenize("It's £20-25, Café ÉCOLE 3.5 5. A&amp;B x&quot;") == \
        ["it's", "£20", "-", "25", ",", "café", "École", "3.5", "5", ".", "a", "&", "b", "x", '"']
    assert mteval.tokenize("  ") == []


def test_bleu_brevity_uses_the_closest_reference_and_nist_averages_over_non_empty_references():
    import math
    refs = [["a b c d e f", "a b c"], ["x y z w"]]  # the second instance gets an empty padding reference
    bleu, nist = mteval.bleu_nist(refs, ["a b c", "x y"])
    # BLEU: closest reference lengths 3 and 4 (the empty pad is skipped), hypothesis 5 words; 1-3-gram precisions
    # are 5/5, 3/3, 1/1 and there are no hypothesis 4-grams (counted as precision 1): BLEU = BP = exp(1 - 7/5).
    assert bleu == pytest.approx(math.exp(1 - 7 / 5))
    # NIST: 13 reference words; info(a|b|c) = log2(13/2), info(x|y) = log2(13); every bigram/trigram info is 0
    # (count equals its prefix's). Length penalty on 5 words vs 13 words / (3 non-empty refs / 2 segments): the
    # pad is not a reference (mteval-v13a-sig.pl counts `$ref_seg ne ''`), so the average is 13 / 1.5, not 13 / 2.
    info = (3 * math.log2(13 / 2) + 2 * math.log2(13)) / 5
    beta = math.log(2) / math.log(1.5) ** 2
    assert nist == pytest.approx(info * math.exp(-beta * math.log(5 / (13 / 1.5)) ** 2))


def test_empty_references_pad_like_measure_scores():
    assert mteval._reference_documents([["a", "b"], ["c"]]) == [["a", "b"], ["c", ""]]
    # Eleven references: documents are visited in string order ref_0, ref_1, ref_10, ref_2, ...
    assert mteval._reference_documents([[str(i) for i in range(11)]])[0][:4] == ["0", "1", "10", "2"]


# --- loaders ---------------------------------------------------------------------------------------------------------

def test_text_refs_blank_line_groups_and_single_reference_files(tmp_path):
    multi = tmp_path / "multi.txt"
    multi.write_bytes(b"a 1\r\na 2 \r\n\r\nb 1\r\n\r\n")
    assert load_refs(multi) == [["a 1", "a 2"], ["b 1"]]
    single = tmp_path / "single.txt"
    single.write_text("one\ntwo\n", encoding="utf-8")
    assert load_refs(single) == [["one"], ["two"]]


def test_csv_refs_group_by_mr_with_bom_and_header_case(tmp_path):
    path = tmp_path / "refs.csv"
    path.write_text('\ufeffMR,REF\n"name[A]",x Ã© Â£5\n"name[A]",y\n"name[B]",z\n', encoding="utf-8")
    assert load_refs(path) == [["x é £5", "y"], ["z"]]


def test_predictions_crlf_trailing_spaces_and_empty_lines(tmp_path):
    path = tmp_path / "pred.txt"
    path.write_bytes(b"one  \r\n\r\n two\r\n")
    assert load_predictions(path) == ["one", "", "two"]


# --- errors and CLI --------------------------------------------------------------------------------------------------

def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.score", *args], cwd=ROOT, capture_output=True, text=True)


def test_count_mismatch_names_both_counts(tmp_path):
    pred = tmp_path / "pred.txt"
    pred.write_text("only one\n", encoding="utf-8")
    r = run_cli(["--refs", str(FIX / "devel-conc.txt"), "--predictions", str(pred)])
    assert r.returncode == 2 and r.stdout == ""
    assert "1 predictions" in r.stderr and "10 instances" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(DataError, match="1 predictions but 10"):
        scoring.score(load_refs(FIX / "devel-conc.txt"), ["x"])


def test_bad_files_are_named(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    no_cols = tmp_path / "nocols.csv"
    no_cols.write_text("a,b\n1,2\n", encoding="utf-8")
    for path, what in [(latin1, "not UTF-8"), (no_cols, "'mr' and 'ref'"), (tmp_path / "missing.csv", "no such")]:
        with pytest.raises(DataError, match=what) as e:
            load_refs(path)
        assert str(path) in str(e.value)
    r = run_cli(["--refs", str(tmp_path / "missing.txt"), "--predictions", str(latin1)])
    assert r.returncode == 2 and "missing.txt" in r.stderr and "Traceback" not in r.stderr


def test_missing_java_says_how_to_install(monkeypatch):
    monkeypatch.setattr(meteor_mod.shutil, "which", lambda name: None)
    with pytest.raises(JavaError, match="apt-get install default-jre-headless"):
        scoring.score([["a"]], ["a"])


def test_cli_warns_on_empty_predictions_merges_extra_and_writes_atomically(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(score_cli, "score", lambda refs, preds, mode: dict.fromkeys(score_cli.METRICS, 0.5))
    pred = tmp_path / "pred.txt"
    pred.write_text("x\n\ny\n\n".replace("\n\n\n", "\n\n"), encoding="utf-8")
    refs = tmp_path / "refs.txt"
    refs.write_text("r1\n\nr2\n\nr3\n\nr4\n", encoding="utf-8")
    extra = tmp_path / "extra.json"
    extra.write_text('{"trainable_params": 350000, "train_seconds": 12.5}', encoding="utf-8")
    out = tmp_path / "scores.json"
    assert cli.run("score", score_cli.main, ["--refs", str(refs), "--predictions", str(pred), "--output", str(out),
                           "--extra", str(extra)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "2 empty prediction line(s)" in captured.err
    assert json.loads(out.read_text()) == {**dict.fromkeys(score_cli.METRICS, 0.5), "trainable_params": 350000,
                                           "train_seconds": 12.5, "mode": "perl", "units": "fraction"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    extra.write_text('{"bleu": 1}', encoding="utf-8")
    assert cli.run("score", score_cli.main,
                   ["--refs", str(refs), "--predictions", str(pred), "--extra", str(extra)]) == 2
    assert "collide" in capsys.readouterr().err


# --- METEOR with a filtered paraphrase table (stages/lib/scoring/paraphrase.py) -----------------------------------------

meteor_table = paraphrase  # the module's former name

METEOR_NORMALIZER = ["java", "-Dfile.encoding=UTF-8", "-Dsun.stdout.encoding=UTF-8", "-cp", str(paraphrase.METEOR_JAR),
                     "edu.cmu.meteor.util.Normalizer", "en", "true"]


def meteor_inputs() -> dict[str, tuple[list[list[str]], list[str]]]:
    """PTB-tokenized (refs, hyps) as score() hands them to METEOR: both fixture cases, the edge texts (each scored
    against the next two), and one system output on the E2E test set when ../shared is there."""
    raw = {name: (load_refs(FIX / c["references"]), load_predictions(FIX / c["predictions"]))
           for name, c in CASES.items()}
    n = len(EDGE_TEXTS)
    raw["edge-texts"] = ([[EDGE_TEXTS[(i + 1) % n], EDGE_TEXTS[(i + 2) % n]] for i in range(n)], EDGE_TEXTS)
    if SHARED.is_dir():
        raw["sclstm"] = (load_refs(SHARED / "testset_w_refs.csv"), load_predictions(SHARED / "system-outputs" /
                                                                                     "sclstm.txt"))
    return {k: ([[coco_tokenize(r) for r in inst] for inst in refs], [coco_tokenize(p) for p in preds])
            for k, (refs, preds) in raw.items()}


def pycocoevalcap_meteor(inputs: dict) -> dict[str, tuple[str, list[str], list[str]]]:
    """The oracle: pycocoevalcap's own Meteor wrapper (its command line, the full 5.3 M-entry paraphrase table),
    one JVM for all inputs; per input the corpus score, the per-segment scores and METEOR's per-segment statistics."""
    from pycocoevalcap.meteor.meteor import Meteor
    m = Meteor()
    out = {}
    for name, (refs, hyps) in inputs.items():
        stats = [m._stat(h, r) for r, h in zip(refs, hyps)]  # as Meteor.compute_score does, keeping the stats
        m.meteor_p.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        m.meteor_p.stdin.flush()
        segs = [m.meteor_p.stdout.readline().decode().strip() for _ in hyps]
        out[name] = (m.meteor_p.stdout.readline().decode().strip(), segs, stats)
    return out


@needs_java
def test_meteor_with_filtered_paraphrases_equals_pycocoevalcap_with_the_full_table(monkeypatch):
    inputs = meteor_inputs()
    kept: list[int] = []
    real_filter = meteor_table.filtered

    def spy(*a, **k):
        data, n = real_filter(*a, **k)
        kept.append(n)
        return data, n
    monkeypatch.setattr(meteor_table, "filtered", spy)
    with ThreadPoolExecutor(2) as pool:
        oracle = pool.submit(pycocoevalcap_meteor, inputs)
        ours = {name: meteor_mod.meteor(refs, hyps) for name, (refs, hyps) in inputs.items()}
        expected = oracle.result()
    assert len(kept) == len(inputs) and all(0 < k < 5_274_084 for k in kept), kept  # really filtered
    for name in inputs:
        score, segment_scores, stats = expected[name]
        assert ours[name].segment_stats == stats, name  # match counts per module (paraphrase included), chunks
        assert ours[name].segment_scores == segment_scores, name
        assert repr(ours[name].score) == repr(float(score)), name
    # Not vacuous: paraphrase matches (4th module; content and function words, test and reference side) abound...
    para = [sum(float(s.split()[k]) for s in ours["dev-first-ref"].segment_stats) for k in (7, 11, 15, 19)]
    assert sum(para) > 1000, para
    # ...and the comparison sees a table that lacks them.
    refs, hyps = inputs["example-inputs"]
    monkeypatch.setattr(meteor_table, "filtered",
                        lambda table, vocab, root=None, **kw: real_filter(table, set(), root, **kw))
    assert meteor_mod.meteor(refs, hyps).segment_stats != expected["example-inputs"][2]


@needs_java
def test_meteor_vocabulary_covers_what_meteors_normalizer_produces(tmp_path):
    """Oracle: METEOR's own Normalizer class from the jar (then lowercasing) on raw and PTB-tokenized texts; our
    vocabulary must contain every word it yields, or a paraphrase entry could be dropped."""
    texts = [r for inst in load_refs(FIX / "devel-conc.txt") for r in inst] + EDGE_TEXTS + [
        "U.S.-based e.g. Inc. No. 5 ... x.. a...b ``quoted'' ‘single’ “double” 20–30 a--b a---b rock'n'roll 1990's",
        "Š Ž ÀÖØöøž naïve İstanbul KELVIN \u212a DOTMULTI x,y 3,000 a,1 1,a it's o'neil dogs' '90s 'tis x.y.z. Mr. X"]
    if SHARED.is_dir():
        texts += load_predictions(SHARED / "system-outputs" / "sclstm.txt")
    segments = texts + [coco_tokenize(t) for t in texts]
    run = subprocess.run(METEOR_NORMALIZER, input="\n".join(segments) + "\n", capture_output=True, text=True,
                         encoding="utf-8", check=True)
    produced = {w for line in run.stdout.split("\n") for w in line.lower().split()}
    missing = produced - meteor_table.vocabulary(segments)
    assert not missing, sorted(missing)[:20]


def _write_table(path: Path, entries: list[tuple[str, str]]) -> None:
    import gzip
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, (ref, par) in enumerate(entries):
            f.write(f"0.{i + 1}\n{ref}\n{par}\n")


def test_filtered_table_keeps_exactly_the_matchable_entries_in_order(tmp_path):
    long_word = "a" * (meteor_table.MAX_SUBSTRING + 1)
    entries = [("the cat", "a cat"), ("dog", "hound"), ("the  cat\t", "the feline"), ("café", "cafe"),
               ("the cat", "a cat"), ("x", "y z"), ("a", "the"), ("Cat", "cat"), ("cat", "café bar"), (long_word, "a")]
    table = tmp_path / "para.gz"
    _write_table(table, entries)
    cache = tmp_path / "cache"
    out = tmp_path / "out.gz"
    vocab = {"the", "cat", "a", "cafe", "z"}
    n = meteor_table.filter_table(table, vocab, out, root=cache)
    import gzip
    lines = gzip.open(out, "rt", encoding="utf-8").read().split("\n")
    kept = list(zip(lines[1::3], lines[2::3]))
    # all words present (non-ASCII table words count as present; phrases come back single-spaced), order and
    # duplicates kept; "Cat" is absent: METEOR lowercases the input, never the table; a word longer than the
    # substrings vocabulary() lists is kept whatever the vocabulary
    assert kept == [("the cat", "a cat"), ("café", "cafe"), ("the cat", "a cat"), ("a", "the"), (long_word, "a")]
    assert n == 5 and lines[0::3][:-1] == ["1"] * 5 and lines[-1] == ""


def test_paraphrase_index_is_cached_by_table_and_built_atomically(tmp_path, monkeypatch):
    table = tmp_path / "para.gz"
    _write_table(table, [("a", "b")])
    cache = tmp_path / "cache"
    built = meteor_table.ensure_index(table, cache)
    assert meteor_table.ensure_index(table, cache) == built  # reused, not rebuilt
    _write_table(table, [("a", "b"), ("b", "c")])  # a changed table (size, mtime) gets a fresh index
    real_build = meteor_table.build_index

    def failing_build(table, dest, **kw):
        real_build(table, dest, chunk_bytes=4)  # tiny chunks: entries split across reads still index right
        shutil.copytree(dest, tmp_path / "ok-index")
        shutil.rmtree(dest)
        raise OSError("disk full")
    monkeypatch.setattr(meteor_table, "build_index", failing_build)
    with pytest.raises(OSError):
        meteor_table.ensure_index(table, cache)
    assert sorted(p.name for p in (cache / "meteor-paraphrase").iterdir()) == [".lock", built.name]  # no partial
    monkeypatch.setattr(meteor_table, "build_index", real_build)
    assert meteor_table.filter_table(table, {"a", "b"}, tmp_path / "o.gz", root=cache) == 1
    import numpy as np
    assert np.load(tmp_path / "ok-index" / "ref_counts.npy").tolist() == [1, 1]


def test_filtering_failure_falls_back_to_the_full_table(monkeypatch, capsys):
    def boom(*a, **k):
        raise meteor_table.TableError("broken")

    class FakeJvm:  # stands for the JVM started on the table's pipe: alive until killed
        killed = False
        def poll(self):
            return 0 if self.killed else None
        def kill(self):
            self.killed = True
        def wait(self):
            return 0
    started = []

    def start(table=None, pass_fds=()):
        started.append(table)
        if table is None:
            raise JavaError("stop here")
        return FakeJvm()
    monkeypatch.setattr(meteor_table, "filtered", boom)
    monkeypatch.setattr(meteor_mod, "_start_meteor", start)
    if shutil.which("java") is None:
        monkeypatch.setattr(meteor_mod.shutil, "which", lambda name: "/usr/bin/java")
    run = meteor_mod.Meteor()
    with pytest.raises(JavaError, match="stop here"):
        run.run([["a b"]], ["a b"])
    assert started[-1] is None and len(started) in (1, 2)  # 2 where /dev/fd exists: the first JVM is dropped
    assert "loading the full table" in capsys.readouterr().err and run.tmpdir is None
