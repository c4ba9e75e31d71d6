"""stages/lib/lifeline.py: a stage dies with the DVC that started it and writes nothing; two runs never write one
output. Real processes (tests/lifeline_child.py is the stand-in stage, run through cli.run as every stage is):
a parent SIGKILLed mid-run, the stage must be gone within seconds, its output not published, nothing left beside
it. Waits are polls with deadlines, never fixed sleeps."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.lib import cli, lifeline
from stages.lib.lifeline import Process, starters

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "lifeline_child.py"
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def P(pid: int, *argv: str) -> Process:
    return Process(pid, "1", tuple(argv))


# --- who started the stage ---------------------------------------------------------------------------------------

def test_the_starter_is_the_nearest_dvc_ancestor_through_its_shell():
    sh, dvc, make = P(3, "/bin/sh", "-c", "python -m stages.train"), P(2, "/venv/bin/python", "/venv/bin/dvc",
                                                                         "repro"), P(1, "make", "repro")
    assert starters([sh, dvc, make]) == [sh, dvc]
    assert starters([dvc, make]) == [dvc]  # bash execs the command: no shell between
    launcher = P(4, "/venv/bin/python", "-m", "stages.train", "--method", "lora")  # train.processes > 1
    assert starters([launcher, sh, dvc, make]) == [launcher, sh, dvc]
    for argv in (("dvc", "exp", "run"), ("python3", "-m", "dvc", "repro"), ("/usr/bin/dvc", "repro")):
        assert starters([sh, P(9, *argv)]) == [sh, P(9, *argv)]


def test_without_dvc_the_starter_is_the_first_ancestor_that_is_not_a_sh_c_wrapper():
    sh, parent, login = P(3, "/bin/sh", "-c", "python -m x"), P(2, "python", "run.py"), P(1, "-bash")
    assert starters([sh, parent, login]) == [sh, parent]
    assert starters([P(5, "bash"), login]) == [P(5, "bash")]  # an interactive shell did start it
    assert starters([parent]) == [parent] and starters([]) == []
    assert starters([P(6, "python", "dvc_report.py"), parent]) == [P(6, "python", "dvc_report.py")]  # not dvc


@linux_only
def test_a_reused_pid_is_not_the_watched_process():
    me = lifeline.process(os.getpid())
    assert lifeline.alive(me)
    assert not lifeline.alive(Process(me.pid, str(int(me.start) + 1), me.argv))


def test_in_process_runs_get_no_watcher_and_no_signal_handlers():
    """Tests call cli.run with an explicit argv: the pytest process must not stop when its shell does."""
    before = signal.getsignal(signal.SIGTERM)
    assert cli.run("x", lambda argv: 0, []) == 0
    assert signal.getsignal(signal.SIGTERM) is before and lifeline._state["watched"] is None


# --- real processes ----------------------------------------------------------------------------------------------

def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != lifeline.ENV}
    return {**env, "PYTHONPATH": str(ROOT), LOCK_ENV: str(tmp_path / "locks"), **extra}


LOCK_ENV = lifeline.LOCK_DIR_ENV


def _wait_for(path: Path, proc: subprocess.Popen | None = None, seconds: float = 60) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {path.name}: {proc.stderr and proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail(f"{path} never appeared")


def _gone_within(pid: int, seconds: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        p = lifeline.process(pid)
        if p is None:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _fake_dvc(tmp_path: Path) -> Path:
    """A parent whose command line is DVC's (`python .../dvc CMD`), running CMD through /bin/sh -c as DVC does."""
    script = tmp_path / "bin" / "dvc"
    script.parent.mkdir()
    script.write_text("import subprocess, sys\nsys.exit(subprocess.call(['/bin/sh', '-c', sys.argv[1]]))\n")
    return script


def _stage_cmd(out: Path, ready: Path, *flags: str, err: Path | None = None) -> str:
    cmd = f"{sys.executable} {CHILD} {out} --ready {ready} {' '.join(flags)}"
    return cmd + (f" 2> {err}" if err else "")


def _no_leftovers(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir())


@linux_only
@pytest.mark.parametrize("parent", ["dvc-like parent", "plain parent"])
def test_sigkill_of_the_parent_stops_the_stage_through_its_sh_and_nothing_is_published(tmp_path, parent):
    """`parent` -> /bin/sh -c (dash: stays as an intermediate parent) -> the stage. SIGKILL the parent: the sh
    lives on, reparented; the stage must stop anyway, within seconds, without publishing its output."""
    work = tmp_path / "work"
    work.mkdir()
    out, ready, err = work / "out.txt", tmp_path / "ready", tmp_path / "err.txt"
    cmd = _stage_cmd(out, ready, err=err)
    argv = ([sys.executable, str(_fake_dvc(tmp_path)), cmd] if parent == "dvc-like parent" else
            [sys.executable, "-c", "import subprocess, sys; subprocess.call(['/bin/sh', '-c', sys.argv[1]])", cmd])
    top = subprocess.Popen(argv, env=_env(tmp_path))
    stage = _wait_for(ready, top)
    try:
        assert lifeline.process(stage) is not None
        top.kill()
        top.wait()
        took = _gone_within(stage, 5)
        assert took is not None, "the stage outlived its parent"
    finally:
        _kill(stage)
    assert _no_leftovers(work) == []  # neither out.txt nor its temporary sibling
    assert "child: stopped: " in err.read_text() and f"(pid {top.pid}) that started this stage is gone" in \
        err.read_text()


@linux_only
def test_launcher_and_its_workers_all_stop_when_dvc_dies(tmp_path):
    """As train.processes > 1: the stage relaunches itself as workers (torch.distributed.run); every one of them
    has the DVC in its ancestry and stops with it."""
    work = tmp_path / "work"
    work.mkdir()
    out, ready = work / "out.txt", tmp_path / "ready"
    top = subprocess.Popen([sys.executable, str(_fake_dvc(tmp_path)), _stage_cmd(out, ready, "--workers", "2")],
                           env=_env(tmp_path))
    launcher = _wait_for(ready, top)
    workers = [_wait_for(Path(f"{ready}.worker{i}"), top) for i in range(2)]
    try:
        top.kill()
        top.wait()
        assert all(_gone_within(pid, 5) is not None for pid in (launcher, *workers))
    finally:
        for pid in (launcher, *workers):
            _kill(pid)
    assert _no_leftovers(work) == []


@linux_only
@pytest.mark.skipif(shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc").exists(),
                    reason="dvc not installed")
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_sigkill_of_a_real_dvc_repro_stops_its_stage(tmp_path, shell):
    """`dvc repro` runs the stage through $SHELL -c (dash stays in between, bash execs): SIGKILL the dvc process,
    the stage stops, its declared output never appears."""
    ws = tmp_path / "ws"
    ws.mkdir()
    env = _env(tmp_path, SHELL=shell)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=ws, env=env, check=True)
    ready = tmp_path / "ready"
    (ws / "dvc.yaml").write_text(f"stages:\n  loop:\n    cmd: {_stage_cmd(Path('out.txt'), ready)}\n"
                                 "    outs:\n      - out.txt\n")
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    stage = _wait_for(ready, dvc)
    try:
        dvc.kill()
        dvc.wait()
        assert _gone_within(stage, 5) is not None, "the stage outlived dvc"
    finally:
        _kill(stage)
    log = dvc.stdout.read().decode()
    assert "child: stopped: " in log and "that started this stage is gone" in log, log
    assert sorted(p.name for p in ws.iterdir()) == [".dvc", ".dvcignore", "dvc.yaml"]


@linux_only
def test_sigterm_while_stuck_in_native_code_exits_after_the_grace_period(tmp_path):
    """The main thread blocks SIGTERM and sleeps in C (as a rank stuck in a collective): the handler cannot run;
    the process still exits, GRACE_S after the signal, with SIGTERM's status."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path / "out.txt"), "--ready", str(ready), "--stuck"],
                            env=_env(tmp_path), stderr=subprocess.PIPE)
    _wait_for(ready, proc)  # SIGTERM is blocked by then, and the main thread goes on into a native sleep
    proc.terminate()
    start = time.monotonic()
    try:
        status = proc.wait(timeout=lifeline.GRACE_S + 10)
    finally:
        proc.kill()
    assert status == 128 + signal.SIGTERM and time.monotonic() - start < lifeline.GRACE_S + 3
    assert "stopped: SIGTERM received; no clean exit within" in proc.stderr.read().decode()


@linux_only
def test_sigterm_is_a_clean_stop_with_one_line(tmp_path):
    ready, out = tmp_path / "ready", tmp_path / "out.txt"
    proc = subprocess.Popen([sys.executable, str(CHILD), str(out), "--ready", str(ready)], env=_env(tmp_path),
                            stderr=subprocess.PIPE, text=True)
    _wait_for(ready, proc)
    proc.terminate()
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert proc.stderr.read() == "child: stopped: SIGTERM received\n"
    assert _no_leftovers(tmp_path) == ["ready"]  # out.txt's temporary sibling removed, out.txt never published


@linux_only
def test_lifeline_can_be_turned_off(tmp_path):
    """LORA_E2E_LIFELINE=0: a stage started by hand that must outlive its shell (nohup ... &)."""
    ready, out = tmp_path / "ready", tmp_path / "out.txt"
    top = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.call(sys.argv[1:])",
                            sys.executable, str(CHILD), str(out), "--ready", str(ready)],
                           env=_env(tmp_path, **{lifeline.ENV: "0"}))
    stage = _wait_for(ready, top)
    try:
        top.kill()
        top.wait()
        assert _gone_within(stage, 1.5) is None  # still running
    finally:
        _kill(stage)


# --- one run per output --------------------------------------------------------------------------------------------

@linux_only
def test_a_second_run_on_the_same_output_is_refused_naming_the_path_and_the_first_runs_pid(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "models" / "lora"
    env = _env(tmp_path)
    first = subprocess.Popen([sys.executable, str(CHILD), str(out), "--ready", str(tmp_path / "r1"), "--lock"],
                             env=env)
    pid = _wait_for(tmp_path / "r1", first)
    try:
        # the same path spelled another way (relative, through a symlink) is the same output
        (tmp_path / "link").symlink_to(work)
        second = subprocess.run([sys.executable, str(CHILD), "link/models/lora", "--ready", str(tmp_path / "r2"),
                                 "--lock"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and second.stderr.startswith("child: error: link/models/lora: ")
        assert f"another run is writing this test output (pid {pid}" in second.stderr
        assert not (tmp_path / "r2").exists()
    finally:
        first.kill()
        first.wait()
    # SIGKILL runs no cleanup; the kernel dropped the lock with the process: a new run goes ahead
    third = subprocess.run([sys.executable, str(CHILD), str(out), "--ready", str(tmp_path / "r3"), "--lock",
                            "--done"], env=env, capture_output=True, text=True, timeout=60)
    assert third.returncode == 0, third.stderr
    assert (out).read_text() == "partial\n"
    # no lock file in the workspace, and the SIGKILLed run's temporary sibling was swept by the next run
    assert _no_leftovers(work / "models") == ["lora"]
    assert _no_leftovers(tmp_path / "locks") == []  # and none left where they live


def test_exclusive_passes_through_for_nested_use_and_for_descendants(tmp_path, monkeypatch):
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "locks"))
    out = tmp_path / "out"
    with lifeline.exclusive(out):
        with lifeline.exclusive(out):  # nested in one process
            pass
        code = ("import sys; from stages.lib import lifeline\n"
                "with lifeline.exclusive(sys.argv[1]): print('worker holds it')\n")
        worker = subprocess.run([sys.executable, "-c", code, str(out)], env=_env(tmp_path), capture_output=True,
                                text=True, timeout=60)
        assert worker.returncode == 0 and worker.stdout == "worker holds it\n", worker.stderr
    assert list((tmp_path / "locks").iterdir()) == []
