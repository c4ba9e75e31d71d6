"""Bad input and faults, as a user meets them: each stage run as `python -m stages.X`, as DVC runs it.

Every row: the exit status (2 for input the user can fix, 1 for a run that failed), ONE line on stderr that names
the parameter, file or line (no traceback), and no partial output left where the stage writes.
"""
from __future__ import annotations

import importlib
import math
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_workspace, set_key, write_csv
from stages.lib import cli
from stages import preprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with data/raw, models/base (tiny GPT-2), data/prepared, like the pipeline's after preprocess."""
    return make_workspace(tmp_path_factory.mktemp("ws"), FAST)


FAST = {f"{recipe}.{key}": value for recipe in ("authors", "li_liang") for key, value in (
    ("train.epochs", 1), ("train.warmup_steps", 0), ("generate.num_beams", 1), ("generate.max_new_tokens", 4))}
# The DVCLive log of a run that fails mid-training is kept for diagnosis (the loss curve up to the NaN): outside out/.
TRAIN = ["stages.train", "--method", "lora", "--seed", "110", "--data", "data/prepared", "--base", "models/base",
         "--out", "out/lora", "--costs", "out/costs.json", "--live", "live/train"]


def replace_arg(command: list[str], flag: str, value: str) -> list[str]:
    i = command.index(flag) + 1
    return [*command[:i], value, *command[i + 1:]]


TRAIN_FULL = replace_arg(TRAIN, "--method", "full")
GENERATE = ["stages.generate", "--method", "base", "--data", "data/prepared", "--base", "models/base",
            "--model", "models/base", "--out", "out/base.txt", "--costs", "out/costs.json"]
PREPROCESS = ["stages.preprocess", "--raw", "data/raw", "--base", "models/base", "--out", "out/prepared"]
DOWNLOAD_DATA = ["stages.download_data", "--out", "out/raw"]
DOWNLOAD_MODEL = ["stages.download_model", "--out", "out/model"]


def nan_weights(ws: Path) -> None:
    path = ws / "models/base/model.safetensors"
    tensors = load_file(str(path))
    first = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[first] = torch.full_like(tensors[first], math.nan)
    save_file(tensors, str(path), metadata={"format": "pt"})


def bad_mr(text):
    def edit(ws):
        write_csv(ws / "data/raw/dev.csv", [("name[Aromi], food[Italian]", "ok"), (text, "bad")])
    return edit


E2E = {"protocol": "e2e"}  # cases about the official CSVs


def authors_line(text):
    def edit(ws):
        (ws / "data/raw/valid.txt").write_text("name : Zizzi||Zizzi is nice .\n" + text + "\n", encoding="utf-8")
    return edit


def malformed_prepared_mr(ws):
    """A test set preprocess would have refused (an MR with a NUL and a repeated slot), as if edited after it ran."""
    import datasets
    path = ws / "data/prepared/paper/test"
    table = datasets.load_from_disk(str(path)).to_dict()
    table["mr"][1] = "name : Zizzi | name : Zizzi\x00"
    datasets.Dataset.from_dict(table).save_to_disk(str(ws / "edited"))
    shutil.rmtree(path)
    shutil.move(str(ws / "edited"), path)


def long_test_mr(ws):
    write_csv(ws / "data/raw/test.csv", [("name[" + "Very Long Name " * 40 + "]", "x")])


def local_sources(ws):
    """download from local directories (the air-gapped path): the raw CSVs and the tiny base."""
    return {"protocol": "e2e", "data.source": str(ws / "data/raw"), "model.source": str(ws / "models/base")}


def truncated_weights(ws):
    path = ws / "models/base/model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def broken_csv(ws):
    (ws / "data/raw/dev.csv").write_text('mr,ref\n"name[Aromi]",ok,extra\n')


UNWRITABLE = "/proc/lora-e2e-test/out"  # no one, root included, can create files in /proc


def make_dir_at_out(ws):
    (ws / "out").write_text("a file where the output directory's parent should be\n")


# id: (command, params overrides, edit of the workspace, exit status, what the one line must name)
CASES = {
    "label smoothing nan": (TRAIN, {"authors.train.label_smoothing": math.nan}, None, 2, "train.label_smoothing"),
    "epochs inf": (TRAIN, {"authors.train.epochs": math.inf}, None, 2, "train.epochs must be a finite number"),
    "lr nan (full)": (TRAIN_FULL, {"full.lr": math.nan}, None, 2, "full.lr"),
    "negative seed": (replace_arg(TRAIN, "--seed", "-1"), {}, None, 2, "train.seeds: a seed must be >= 0"),
    "lora targets empty": (TRAIN, {"lora.targets": []}, None, 2, "lora.targets"),
    "lora targets duplicate": (TRAIN, {"lora.targets": ["q", "q"]}, None, 2, "lora.targets: duplicates"),
    "length penalty nan": (GENERATE, {"authors.generate.length_penalty": math.nan}, None, 2, "generate.length_penalty"),
    "base weights nan (train)": (TRAIN, {}, nan_weights, 2, "model.safetensors: 1 weight tensors hold NaN"),
    "base weights nan (generate)": (GENERATE, {}, nan_weights, 2, "model.safetensors: 1 weight tensors hold NaN"),
    "loss diverges": (TRAIN_FULL, {"full.lr": 1e30}, None, 1, "at step"),
    "train out not writable": (replace_arg(TRAIN, "--out", UNWRITABLE), {}, None, 2, "cannot write the output"),
    "generate out not writable": (replace_arg(GENERATE, "--out", UNWRITABLE), {}, None, 2,
                                  "cannot write the output"),
    "train out under a file": (TRAIN, {}, make_dir_at_out, 2, "out/lora: cannot create"),
    "mr missing bracket": (PREPROCESS, E2E, bad_mr("name[The Eagle"), 2, "dev.csv: data row 2 (line 3)"),
    "mr empty value": (PREPROCESS, E2E, bad_mr("name[]"), 2, "empty value for 'name'"),
    "mr unknown syntax": (PREPROCESS, E2E, bad_mr("name=The Eagle"), 2, "expected key[value]"),
    "mr repeated key": (PREPROCESS, E2E, bad_mr("name[A], name[B]"), 2, "'name' appears twice"),
    "test mr too long": (PREPROCESS, {**E2E, "preprocess.max_length": 100}, long_test_mr, 2,
                         "test.csv: test MR 1"),
    "authors line without ||": (PREPROCESS, {}, authors_line("name : Aromi | food : Italian Aromi is nice ."), 2,
                                "valid.txt: line 2"),
    "authors empty reference": (PREPROCESS, {}, authors_line("name : Aromi||"), 2, "valid.txt: line 2"),
    "unknown protocol": (PREPROCESS, {"protocol": "paper"}, None, 2, "protocol must be one of ['authors', 'e2e']"),
    "params not yaml": (PREPROCESS, "a: [b\n", None, 2, "params.yaml: line"),
    "data source null": (DOWNLOAD_DATA, {"data.source": None}, None, 2, "data.source must be a string, got None"),
    "data source missing": (DOWNLOAD_DATA, {"data.source": "file:///e2e"}, None, 2,
                            "data.source: file:///e2e: no such file or directory"),
    "model source mistyped": (DOWNLOAD_MODEL, {"model.source": "models/bsae"}, None, 2,
                              "model.source: models/bsae: no such file or directory"),
    "download csv broken": (DOWNLOAD_DATA, local_sources, broken_csv, 2, "dev.csv: line 2"),
    "download weights truncated": (DOWNLOAD_MODEL, local_sources, truncated_weights, 2, "model.source"),
    "download config invalid": (DOWNLOAD_MODEL, local_sources,
                                lambda ws: (ws / "models/base/config.json").write_text("{not json"), 2,
                                "config.json"),
    "download weights nan": (DOWNLOAD_MODEL, local_sources, nan_weights, 2, "hold NaN"),
    "unknown key": (TRAIN, {"lora.rnak": 8}, None, 2, "unknown parameter lora.rnak"),
    "seeds duplicated": (TRAIN, {"train.seeds": [110, 110]}, None, 2, "train.seeds: duplicates in [110, 110]"),
    "warm-up longer than the run": (TRAIN, {"authors.train.warmup_steps": 10**12}, None, 2,
                                    "train.warmup_steps=1000000000000 > this run's"),
    "warm-up not an integer": (TRAIN, {"authors.train.warmup_steps": 1e12}, None, 2,
                               "train.warmup_steps must be an integer, got 1000000000000.0"),
    "max length beyond positions": (PREPROCESS, {"preprocess.max_length": 512}, None, 2,
                                    "preprocess.max_length=512 > the base model's 128 positions"),
    "authors mr duplicated slot": (PREPROCESS, {}, authors_line("name : A | name : B||A is nice ."), 2,
                                   "valid.txt: line 2"),
    "generate on an mr preprocess refuses": (GENERATE, {}, malformed_prepared_mr, 2, "paper/test: MR 2: malformed MR"),
}


def write_params(ws: Path, overrides) -> None:
    if isinstance(overrides, str):
        (ws / "params.yaml").write_text(overrides)
        return
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for key, value in (overrides(ws) if callable(overrides) else overrides).items():
        set_key(params, key, value)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


def run_module(ws: Path, command: list[str]) -> subprocess.CompletedProcess:
    """Exactly as DVC runs a stage."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LORA_E2E_DEBUG", None)
    return subprocess.run([sys.executable, "-m", *command], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=600)


def run_in_process(ws: Path, command: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """The same entry point (cli.run around the stage's main) without a new interpreter per case."""
    module = importlib.import_module(command[0])
    monkeypatch.chdir(ws)
    monkeypatch.delenv("LORA_E2E_DEBUG", raising=False)
    capsys.readouterr()
    status = cli.run(command[0].split(".")[-1], module.main, command[1:])
    return status, capsys.readouterr().err


def check(ws: Path, status: int, stderr: str, want_status: int, names: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    errors = [line for line in lines if ": error: " in line or ": failed: " in line]
    assert status == want_status, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(errors) == 1 and names in errors[0], stderr[-2000:]
    # No temporary paths. The line may name the workspace and a holder's command line (this Python, the checkout),
    # which sit under /tmp when the checkout does (a CI clone in /tmp).
    shown = errors[0]
    for known in (str(ws), sys.executable, str(ROOT)):
        shown = shown.replace(known, "")
    assert "/.tmp" not in errors[0] and "/tmp" not in shown
    out = ws / "out"
    leftovers = list(out.rglob("*")) if out.is_dir() else []
    assert leftovers == [], leftovers


@pytest.fixture
def fresh(ws, tmp_path):
    """A copy of the module's workspace that a case may break."""
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    return copy


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_line_naming_it_and_no_output(fresh, case, capsys, monkeypatch):
    command, overrides, edit, want_status, names = CASES[case]
    write_params(fresh, overrides)
    if edit:
        edit(fresh)
    status, stderr = run_in_process(fresh, command, capsys, monkeypatch)
    check(fresh, status, stderr, want_status, names)


@pytest.mark.parametrize("case", ["label smoothing nan", "length penalty nan", "mr missing bracket",
                                  "data source null", "model source mistyped", "loss diverges"])
def test_stage_modules_exit_the_same_way_when_run_as_dvc_runs_them(fresh, case):
    """One case per stage module through `python -m`: the `__main__` wiring, not only main()."""
    command, overrides, edit, want_status, names = CASES[case]
    write_params(fresh, overrides)
    if edit:
        edit(fresh)
    proc = run_module(fresh, command)
    check(fresh, proc.returncode, proc.stderr, want_status, names)


def test_internal_errors_are_one_line_unless_debugging(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from stages.lib import cli; sys.exit(cli.run('x', lambda argv: 1 / 0, []))"
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().startswith("x: internal error (ZeroDivisionError")
    loud = subprocess.run([sys.executable, "-c", code], env={**env, "LORA_E2E_DEBUG": "1"}, capture_output=True,
                          text=True)
    assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_params_yaml_has_no_trailing_comments_that_dvc_would_mangle():
    """`dvc exp run -S lora.targets=[]` rewrites a value's line; a trailing comment there broke the YAML."""
    for i, line in enumerate((ROOT / "params.yaml").read_text().splitlines(), start=1):
        code = line.split("#", 1)[0]
        assert not ("#" in line and code.strip()), f"params.yaml line {i}: trailing comment: {line!r}"


def test_outputs_get_the_users_umask(ws, params_file, raw_dir, tmp_path):
    params_file(preprocess__max_length=128)
    old = os.umask(0o022)
    try:
        preprocess.main(["--raw", str(raw_dir), "--base", str(ws / "models/base"), "--out", str(tmp_path / "p")])
    finally:
        os.umask(old)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o755


def test_an_exponent_without_a_dot_is_a_number_as_dvc_writes_it(tmp_path):
    """`dvc exp run -S train.adam_epsilon=1e-8` writes `1e-08`, a string to YAML 1.1 but a float to DVC."""
    from stages.lib import params as P
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  adam_epsilon: 1e-08\n  lr: 5e-5\n  n: 3\n  quoted: '1e-8'\n")
    train = P.load(path)["train"]
    assert train == {"adam_epsilon": 1e-08, "lr": 5e-05, "n": 3, "quoted": "1e-8"}
    from conftest import default_params
    params = set_key(default_params(), "authors.train.adam_epsilon", train["adam_epsilon"])
    assert P.validate(params).authors.train.adam_epsilon == 1e-08


@pytest.mark.parametrize("value, message", [
    ([], "train.seeds must be a non-empty list of seeds"), ([110, 110], "train.seeds: duplicates in [110, 110]"),
    ([1, -1], "integers >= 0"), ([True], "integers >= 0"), ("110", "non-empty list"),
])
def test_seed_lists_are_non_empty_distinct_and_non_negative(value, message):
    """report reads train.seeds (and generate its eos_ids) through this check: a duplicate would count twice."""
    from conftest import default_params
    from stages.lib import params as P
    with pytest.raises(P.ParamError, match=re.escape(message)):
        P.validate(set_key(default_params(), "train.seeds", value))
    assert P.validate(set_key(default_params(), "train.seeds", [110, 111])).train.seeds == [110, 111]


def test_a_second_run_of_a_stage_stops_before_any_work_naming_the_first(fresh):
    """Two runs never share an output or checkpoint folder: while another process (an orphaned trainer, a parallel
    repro) holds out/lora, a second train run says who holds it, exits 2 and writes nothing."""
    code = ("import sys, time; from stages.lib import lifeline\n"
            "with lifeline.exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(fresh / "out/lora")], cwd=fresh, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        proc = run_module(fresh, TRAIN)
    finally:
        holder.kill()
        holder.wait()
    check(fresh, proc.returncode, proc.stderr, 2, f"out/lora: another run is writing this output (pid {holder.pid}")
