"""`dvc plots show` draws DVCLive's curves with no network: DVC's page with Vega inlined (.dvc/plots/offline.html).

DVC's default page loads vega, vega-lite and vega-embed from cdn.jsdelivr.net; offline its Vega plots stay blank.
The rendering check runs the page's own libraries in Node.js on the specs DVC wrote and counts the points drawn.
"""
from __future__ import annotations

import configparser
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"
BIN = Path(sys.executable).parent
# Loads the page's libraries (argv 3...) as a browser would, as globals, then compiles and renders each spec to SVG.
RENDER_JS = """
const vm = require("vm"), fs = require("fs");
const [specFile, ...libs] = process.argv.slice(2);
for (const f of libs) vm.runInThisContext(fs.readFileSync(f, "utf8"), { filename: f });
(async () => {
  const svgs = [];
  for (const spec of JSON.parse(fs.readFileSync(specFile, "utf8"))) {
    const view = new vega.View(vega.parse(vegaLite.compile(spec).spec), { renderer: "none" });
    svgs.push(await view.toSVG());
  }
  process.stdout.write(JSON.stringify({ versions: [vega.version, vegaLite.version, vegaEmbed.version], svgs }));
})().catch((e) => { console.error(String(e)); process.exit(1); });
"""


def vendor():
    spec = importlib.util.spec_from_file_location("vendor_vega", ROOT / "scripts" / "vendor_vega.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inline_scripts(html: str) -> list[str]:
    return re.findall(r"<script>(.*?)</script>", html, re.S)


def test_template_inlines_the_pinned_libraries_and_loads_nothing_over_a_network():
    html = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in html and "{refresh_tag}" in html
    assert "{scripts}" not in html  # where DVC would put its CDN <script src=...> tags
    markup = re.sub(r"<script>.*?</script>", "", html, flags=re.S)  # the page itself, without the libraries' code
    assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)=", markup)
    pinned = [digest for _, _, digest in vendor().LIBS]
    assert [hashlib.sha256(s.encode()).hexdigest() for s in inline_scripts(html)] == pinned


def test_the_project_points_dvc_at_the_template():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert (ROOT / ".dvc" / config["plots"]["html_template"]) == TEMPLATE


@pytest.fixture
def plots_page(tmp_path) -> tuple[str, dict[str, int]]:
    """`dvc plots show` on DVCLive's layout (plots/metrics/*.tsv, x: step) in a fresh repository using the template;
    returns the page and the number of rows of each TSV."""
    repo = tmp_path / "repo"
    metrics = repo / "live" / "plots" / "metrics"
    (metrics / "eval").mkdir(parents=True)
    rows = {"live/plots/metrics/loss.tsv": 4, "live/plots/metrics/eval/loss.tsv": 2}
    for name, n in rows.items():
        (repo / name).write_text("step\tloss\n" + "".join(f"{i}\t{3 - i / 2}\n" for i in range(n)))
    (repo / "dvc.yaml").write_text("plots:\n  - live/plots/metrics:\n      x: step\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "config", "plots.html_template", "plots/offline.html"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    (repo / ".dvc" / "plots").mkdir()
    shutil.copy(TEMPLATE, repo / ".dvc" / "plots" / "offline.html")
    subprocess.run(["dvc", "plots", "show", "-o", "out"], cwd=repo, env=env, check=True, capture_output=True)
    return (repo / "out" / "index.html").read_text(encoding="utf-8"), rows


def test_dvc_writes_the_page_with_the_inlined_libraries_and_no_cdn(plots_page):
    html, rows = plots_page
    assert "cdn.jsdelivr.net" not in html and not re.search(r"<script\b[^>]*\bsrc=", html)
    assert len(inline_scripts(html)) == 3
    assert html.count("vegaEmbed(") == len(rows)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js not installed: rendering the page needs a "
                                                         "JavaScript engine")
def test_the_pages_own_libraries_render_every_curve_with_all_its_points(plots_page, tmp_path):
    html, rows = plots_page
    specs = [json.loads(s) for s in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, re.S)]
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    libs = []
    for i, code in enumerate(inline_scripts(html)):
        libs.append(tmp_path / f"lib{i}.js")
        libs[-1].write_text(code, encoding="utf-8")
    (tmp_path / "render.js").write_text(RENDER_JS)
    done = subprocess.run(["node", str(tmp_path / "render.js"), str(tmp_path / "specs.json"), *map(str, libs)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["versions"] == ["5.30.0", "5.20.1", "6.26.0"]
    drawn = {}
    for spec, svg in zip(specs, out["svgs"]):
        line = re.search(r'aria-roledescription="line mark"[^>]*\bd="([^"]*)"', svg)
        assert line, f"no line drawn for {spec['title']['text']}"
        drawn[spec["title"]["text"]] = len(re.findall(r"[ML]", line.group(1)))  # one M/L command per point
    assert drawn == rows
