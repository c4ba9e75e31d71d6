"""The scorer as a process: its METEOR JVM never outlives it, temp dirs go on every exit Python sees, the output is
checked before scoring and written whole, with the user's umask and sorted keys; bad input and non-finite metrics are
one-line errors with exit status 2."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import stages.lib.scoring as scoring
from stages.lib import outputs
from stages import score as score_cli
from stages.lib import cli as stage_cli
from stages.lib.e2e import DataError
from stages.score import load_refs
from stages.lib.scoring.meteor import MeteorResult

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "scoring"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java runtime not installed")
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _java_children(pid: int) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            st = _stat(int(p.name))
            if st and st[1] == pid and cmd and cmd[0].endswith(b"java"):
                found.append(int(p.name))
    return found


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"  # a killed JVM may linger as a zombie until its new parent reaps it


def _launch_scorer(tmp_path: Path, **env) -> subprocess.Popen:
    """The scorer on the 547-MR dev case, with its temp dir in tmp_path."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, "-m", "stages.score", "--refs", str(FIX / "dev-refs.csv"),
                             "--predictions", str(FIX / "dev-first-ref-output.txt")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _start_scorer(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """The scorer on the 547-MR dev case, with its temp dir in tmp_path; returns it once its JVM is running."""
    proc = _launch_scorer(tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        jvms = _java_children(proc.pid)
        if jvms:
            return proc, jvms[0]
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no JVM seen (scorer exit {proc.poll()})")


def _until(condition, what: str, seconds: float = 60) -> None:
    """Poll `condition` until it holds; fail after `seconds`, saying `what` never happened."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds} s")
        time.sleep(0.02)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _booted(jvm: int) -> bool:
    """The JVM runs its own threads (it has booted and is reading its paraphrase pipe), or is already gone."""
    try:
        return len(os.listdir(f"/proc/{jvm}/task")) > 1
    except FileNotFoundError:
        return True


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


# --- the JVM never outlives the scorer ------------------------------------------------------------------------------

@needs_java
@linux_only
def test_sigkill_of_the_scorer_takes_its_jvm_with_it(tmp_path):
    proc, jvm = _start_scorer(tmp_path)
    _until(lambda: _booted(jvm), "the JVM did not boot")  # mid-run: the JVM is reading its paraphrase pipe
    proc.kill()
    proc.wait()
    try:
        assert _gone_within(jvm, 5), f"JVM {jvm} outlived the SIGKILLed scorer"
    finally:
        if _alive(jvm):
            os.kill(jvm, signal.SIGKILL)


@needs_java
@linux_only
def test_sigterm_kills_the_jvm_and_leaves_no_temporary_files(tmp_path):
    proc, jvm = _start_scorer(tmp_path)
    _until(lambda: _booted(jvm), "the JVM did not boot")
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert _gone_within(jvm, 5)
    finally:
        if _alive(jvm):
            os.kill(jvm, signal.SIGKILL)
    assert "Traceback" not in proc.stderr.read().decode()
    assert list(tmp_path.iterdir()) == []


@needs_java
@linux_only
def test_sigkill_of_the_scorer_leaves_nothing_on_disk(tmp_path):
    """A SIGKILLed process runs no cleanup: the filtered paraphrase table goes to the JVM through an anonymous pipe
    (/dev/fd/N), never a named pipe in a temporary directory, and the JVM writes no /tmp/hsperfdata_<user>/<pid>."""
    proc, jvm = _start_scorer(tmp_path)
    args = Path(f"/proc/{jvm}/cmdline").read_bytes().split(b"\0")
    _until(lambda: _booted(jvm), "the JVM did not boot")  # mid-run: the JVM is reading its paraphrase pipe
    proc.kill()
    proc.wait()
    try:
        assert _gone_within(jvm, 5)
    finally:
        if _alive(jvm):
            os.kill(jvm, signal.SIGKILL)
    assert list(tmp_path.iterdir()) == []
    assert not list(Path("/tmp").glob(f"hsperfdata_*/{jvm}"))
    assert args[args.index(b"-a") + 1].startswith(b"/dev/fd/")


@needs_java
@linux_only
def test_sigterm_during_the_paraphrase_index_build_exits_within_seconds_leaving_nothing(tmp_path):
    """The first run builds METEOR's paraphrase index (10-20 s of numpy work in a worker thread): SIGTERM then used
    to wait for the whole build and the filtering after it (~40 s). The build now polls for cancellation and the
    worker is not joined at exit."""
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    proc = _launch_scorer(tmp, XDG_CACHE_HOME=str(cache))
    lock = cache / "lora-e2e" / "meteor-paraphrase" / ".lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.exists(), f"the index build never started (scorer exit {proc.poll()})"
    # Inside build_index's chunks (seconds of numpy work, before its last step writes anything): the scorer has
    # spent half a CPU second more since it took the build lock.
    started = _cpu_seconds(proc.pid)
    _until(lambda: proc.poll() is not None or _cpu_seconds(proc.pid) > started + 0.5, "the build used no CPU")
    jvms = _java_children(proc.pid)
    proc.terminate()
    start = time.monotonic()
    try:
        status = proc.wait(timeout=60)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for jvm in jvms:
            if _alive(jvm):
                os.kill(jvm, signal.SIGKILL)
    assert status == 128 + signal.SIGTERM and took < 3.0, (status, took)
    assert "Traceback" not in proc.stderr.read().decode()
    assert all(_gone_within(jvm, 5) for jvm in jvms)
    assert list(tmp.iterdir()) == []
    assert sorted(p.name for p in lock.parent.iterdir()) == [".lock"]  # no index, no partial build


# --- output: checked before scoring, written whole, umask, sorted keys ---------------------------------------------

@pytest.fixture
def cli(tmp_path, monkeypatch):
    """score_cli.main on a 3-instance case with a stand-in for score() that records that it ran."""
    calls = []

    def fake_score(refs, preds, mode):
        calls.append(mode)
        return {"nist": 3.0, "bleu": 0.5, "meteor": 0.25, "cider": 1.0, "rouge_l": 0.75}
    monkeypatch.setattr(score_cli, "score", fake_score)
    refs = tmp_path / "refs.txt"
    refs.write_text("a b\n\nc d\n\ne f\n", encoding="utf-8")
    pred = tmp_path / "pred.txt"
    pred.write_text("a b\nc\ne f\n", encoding="utf-8")

    def run(*args: str) -> int:
        return stage_cli.run("score", score_cli.main, ["--refs", str(refs), "--predictions", str(pred), *args])
    run.calls = calls
    return run


@pytest.mark.parametrize("where, message", [("/proc/lora-e2e/out.json", "cannot write"), ("", "is a directory")])
def test_unwritable_output_fails_before_scoring(cli, tmp_path, capsys, where, message):
    """/proc takes no new files, root or not."""
    assert cli("--output", str(tmp_path / where)) == 2
    err = capsys.readouterr().err
    assert cli.calls == [] and message in err and err.count("\n") == 1 and err.startswith("score: error: ")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_fails_before_scoring(cli, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert cli("--output", str(ro / "out.json")) == 2
    assert cli.calls == [] and "cannot write" in capsys.readouterr().err


def test_a_failed_write_is_one_line_and_leaves_nothing(cli, tmp_path, capsys, monkeypatch):
    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(outputs.os, "replace", full_disk)  # the rename that publishes stages/lib/outputs' atomic file
    out = tmp_path / "out" / "scores.json"
    out.parent.mkdir()
    assert cli("--output", str(out)) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and str(out) in err and err.count("\n") == 1
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_output_gets_the_users_umask_sorted_keys_and_same_bytes(cli, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        outs = [tmp_path / "a.json", tmp_path / "b.json"]
        for out in outs:
            assert cli("--output", str(out), "--mode", "python") == 0
    finally:
        os.umask(old)
    assert {o.stat().st_mode & 0o777 for o in outs} == {mode}
    text = outs[0].read_text()
    assert text == outs[1].read_text() and text.endswith("\n")
    keys = list(json.loads(text))
    assert keys == sorted(keys) and json.loads(text)["mode"] == "python" and cli.calls == ["python", "python"]


@pytest.mark.parametrize("units, factor", [("fraction", 1), ("paper", 100)])
def test_units_scale_bleu_meteor_rouge_l_only_and_are_recorded(cli, tmp_path, units, factor):
    """fraction: as measure_scores.py prints them; paper: Table 3's % for BLEU, METEOR, ROUGE-L, NIST and CIDEr raw."""
    out = tmp_path / "out.json"
    assert cli("--output", str(out), "--units", units) == 0
    got = json.loads(out.read_text())
    raw = {"nist": 3.0, "bleu": 0.5, "meteor": 0.25, "cider": 1.0, "rouge_l": 0.75}  # the cli fixture's score()
    assert got["units"] == units
    assert {k: got[k] for k in raw} == {k: v * (factor if k in ("bleu", "meteor", "rouge_l") else 1)
                                        for k, v in raw.items()}


# --- bad input and bad numbers -----------------------------------------------------------------------------------

def test_an_mr_without_references_is_an_error_naming_it(tmp_path):
    refs = tmp_path / "refs.csv"
    refs.write_text('mr,ref\n"name[A]",x\n"name[B]",\n"name[B]",  \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"refs.csv: MR 'name\[B\]' has no references"):
        load_refs(refs)
    pred = tmp_path / "pred.txt"
    pred.write_text("x\ny\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "stages.score", "--refs", str(refs), "--predictions", str(pred)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == "" and "name[B]" in run.stderr and run.stderr.count("\n") == 1


def test_extra_json_with_non_finite_numbers_is_refused(cli, tmp_path, capsys):
    extra = tmp_path / "extra.json"
    extra.write_text('{"train_loss": NaN}', encoding="utf-8")
    assert cli("--extra", str(extra)) == 2
    assert "extra.json: non-finite number NaN" in capsys.readouterr().err and cli.calls == []


@pytest.mark.parametrize("bad", ["meteor", "nist"])
def test_non_finite_metrics_are_refused(monkeypatch, bad):
    class FakeMeteor:  # no JVM: a METEOR that reports `value`
        def run(self, *a):
            return MeteorResult(float("nan") if bad == "meteor" else 0.5, [], [])

        def close(self):
            pass
    monkeypatch.setattr(scoring, "Meteor", FakeMeteor)
    monkeypatch.setitem(scoring.MODES, "perl", lambda r, p: (0.5, float("inf") if bad == "nist" else 1.0))
    with pytest.raises(scoring.ScoreError, match=f"non-finite.*{bad}"):
        scoring.score([["a b c"]], ["a b c"])


# --- the pipeline takes the mode from params.yaml and reruns on any scoring change --------------------------------

def test_score_stage_takes_the_mode_from_params_and_depends_on_the_scoring_package():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["score"]["mode"] in (*scoring.MODES, "auto")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in (stages["score-lora"]["do"], stages["score-full"]["do"], stages["score-base"]):
        assert {"score", "protocol"} <= set(stage["params"])
        assert "--mode ${score.mode} --protocol ${protocol} --units paper" in " ".join(stage["cmd"].split())
        assert {"stages/lib/scoring", "stages/score.py", "stages/lib/e2e.py"} <= set(stage["deps"])


@pytest.mark.parametrize("protocol, mode", [("authors", "python"), ("e2e", "perl")])
def test_auto_mode_scores_as_the_protocol_does(tmp_path, protocol, mode, capsys):
    """protocol authors -> the official scorer's -p mode (the LoRA authors' Table 3); e2e -> its Perl mode."""
    refs, pred = tmp_path / "refs.txt", tmp_path / "pred.txt"
    refs.write_text("the eagle is a cheap pub\nthe eagle pub is cheap\n\nzizzi serves french food\n")
    pred.write_text("the eagle is a cheap pub near the river\nzizzi serves food\n")
    args = ["--mode", "auto", "--protocol", protocol, "--refs", str(refs), "--predictions", str(pred),
            "--output", str(tmp_path / "out.json")]
    assert stage_cli.run("score", score_cli.main, args) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    direct = scoring.score([["the eagle is a cheap pub", "the eagle pub is cheap"], ["zizzi serves french food"]],
                           ["the eagle is a cheap pub near the river", "zizzi serves food"], mode=mode)
    assert out["mode"] == mode and out["nist"] == direct["nist"] and out["bleu"] == direct["bleu"]