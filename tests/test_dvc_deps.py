"""dvc.yaml lists, for every stage, exactly the project code that the stage runs.

DVC reruns a stage only when one of its `deps` changed: a module missing there means a fix to it leaves a stale,
wrong result cached and committed. The code a stage runs is the import closure of its `python -m stages.X`
command, computed here with `ast` from the sources themselves.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from stages.lib.code import PACKAGE, ROOT, closure, imports_of, module_file


def stage_modules() -> set[str]:
    """`stages.<name>` for every module at the top of stages/: by the layout's rule, exactly the DVC stages."""
    return {f"{PACKAGE}.{p.stem}" for p in (ROOT / PACKAGE).glob("*.py") if p.stem != "__init__"}


def expand(stages: dict, params: dict | None = None) -> dict[str, dict]:
    """foreach and matrix stages as DVC names them (`train-lora@110`, `x@lora-110`), ${item...} substituted, and
    every other ${key} outside `cmd` taken from params.yaml (or `params`) as DVC takes it (`${lora.recipe}.train`);
    in `cmd` it stays, to say which keys DVC writes into the command."""
    params = params if params is not None else yaml.safe_load((ROOT / "params.yaml").read_text())

    def lookup(key: str):
        node = params
        for part in key.split("."):
            node = node[part]
        return node

    def resolve(body: dict, items: dict) -> dict:
        text = yaml.safe_dump({k: v for k, v in body.items() if k != "cmd"}, width=10_000)
        for key, value in items.items():
            text = text.replace("${%s}" % key, str(value))
        text = re.sub(r"\$\{([\w.]+)\}", lambda m: str(lookup(m.group(1))), text)
        cmd = body.get("cmd", "")
        for key, value in items.items():
            cmd = cmd.replace("${%s}" % key, str(value))
        return {**yaml.safe_load(text), "cmd": cmd}

    out = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            items = stage["foreach"]
            for item in lookup(items[2:-1]) if isinstance(items, str) else items:
                out[f"{name}@{item}"] = resolve(stage["do"], {"item": item})
        elif "matrix" in stage:
            axes = {k: lookup(v[2:-1]) if isinstance(v, str) else v for k, v in stage["matrix"].items()}
            body = {k: v for k, v in stage.items() if k != "matrix"}
            for combo in itertools.product(*axes.values()):
                items = {f"item.{k}": v for k, v in zip(axes, combo)}
                out[f"{name}@{'-'.join(map(str, combo))}"] = resolve(body, items)
        else:
            out[name] = resolve(stage, {})
    return out


def dep_paths(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def problems(stages: dict[str, dict]) -> list[str]:
    """Every code file a stage runs but does not list, or lists but does not run."""
    found = []
    for name, stage in stages.items():
        modules = re.findall(r"python -m ([\w.]+)", stage["cmd"])
        runs = set().union(*(set(closure(m)) for m in modules)) if modules else set()
        deps = [Path(d) for d in dep_paths(stage)]
        code_deps = {d for d in deps if d.parts[0] == PACKAGE}
        covered = {f for f in runs if any(f == d or d in f.parents for d in code_deps)}
        found += [f"{name}: runs {f} but does not list it in deps" for f in sorted(runs - covered)]
        for d in sorted(code_deps):
            if not any(f == d or d in f.parents for f in runs):
                found.append(f"{name}: lists {d} in deps but does not run it")
    return found


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return expand(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_every_stage_lists_exactly_the_code_it_runs(stages):
    assert problems(stages) == []


def test_every_code_dep_line_is_needed(stages):
    """The check above has teeth: deleting any one code dep of any stage is reported, naming stage and file."""
    checked = 0
    for name, stage in stages.items():
        for dep in dep_paths(stage):
            if not dep.startswith(f"{PACKAGE}/"):
                continue
            cut = {name: {**stage, "deps": [d for d in stage["deps"] if d != dep]}}  # the other stages are fine
            assert any(p.startswith(f"{name}: runs {dep}") for p in problems(cut)), (name, dep)
            checked += 1
    assert checked >= len(stages)


def test_stage_modules_never_import_each_other(stages):
    """A stage's code is its own file plus shared modules: one stage's change never reruns another stage."""
    stage_mods = {m for s in stages.values() for m in re.findall(r"python -m ([\w.]+)", s["cmd"])}
    files = {module_file(m).relative_to(ROOT): m for m in stage_mods}
    for module in sorted(stage_mods):
        others = (set(closure(module)) & files.keys()) - {module_file(module).relative_to(ROOT)}
        assert not others, f"{module} imports stage module(s) {sorted(map(str, others))}"


def test_closure_follows_from_imports_and_relative_imports(tmp_path):
    """The closure itself: module-level, function-level and `from stages import x` forms are all found."""
    assert Path("stages/lib/gpt2.py") in closure("stages.train")
    assert Path("stages/lib/cli.py") in closure("stages.train")  # via stages.lib.params, transitively
    assert Path("stages/preprocess.py") not in closure("stages.train")


def test_the_top_of_stages_holds_exactly_the_dvc_stages(stages):
    """`ls stages/` shows the pipeline: every module there is a stage's command, every stage's command is there;
    the library (stages/lib) and the hand-run tools (stages/tools) sit in their own packages."""
    commands = {m for s in stages.values() for m in re.findall(r"python -m ([\w.]+)", s["cmd"])}
    assert commands == stage_modules()


def test_the_library_imports_no_stage_and_no_tool():
    """stages/lib is what stages share: it never reaches up into a stage or a tool (no cycles, no hidden deps)."""
    for path in sorted((ROOT / PACKAGE / "lib").rglob("*.py")):
        up = {m for m in imports_of(path) if not m.startswith(f"{PACKAGE}.lib")}
        assert up == set() or up == {PACKAGE}, f"{path.relative_to(ROOT)} imports {sorted(up)}"
