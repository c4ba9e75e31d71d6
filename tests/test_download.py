"""download-data and download-model, hermetically: local sources, pins served by a mirror and a fake hub on
127.0.0.1, tiny models."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from conftest import TOKENIZER
from stages import download_data, download_model
from stages.lib import cli
from stages.lib.outputs import git_blob_id

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REVISION = "0123456789abcdef0123456789abcdef01234567"
CSV = {
    "trainset.csv": 'mr,ref\n"name[The Eagle], food[French]",The Eagle serves French food.\n'
                    '"name[Aromi], area[riverside]",Aromi is by the river.\n',
    "devset.csv": 'mr,ref\n"name[Zizzi], food[Italian]",Zizzi serves Italian food.\n',
    "testset_w_refs.csv": 'mr,ref\n"name[Cotto], priceRange[cheap]",Cotto is cheap.\n'
                          '"name[Cotto], priceRange[cheap]",Cotto is a cheap place.\n',
}
OUT_NAMES = {"trainset.csv": "train.csv", "devset.csv": "dev.csv", "testset_w_refs.csv": "test.csv"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 1-layer GPT-2 saved as safetensors, with the real GPT-2 tokenizer (download-model checks it is GPT-2's)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(d)
    shutil.copyfile(TOKENIZER, d / "tokenizer.json")
    assert (d / "model.safetensors").is_file() and not (d / "pytorch_model.bin").exists()
    return d


@pytest.fixture
def csv_dir(tmp_path) -> Path:
    d = tmp_path / "e2e"
    d.mkdir()
    for name, text in CSV.items():
        (d / name).write_text(text)
    return d


def write_params(tmp_path, data_source, model_source, protocol) -> None:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base.update(protocol=protocol, data={"source": str(data_source)}, model={"source": str(model_source)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base))


def run_stage(tmp_path, data_source, model_source, protocol="e2e", monkeypatch=None) -> int:
    """download-data, then (if it succeeded) download-model, as dvc runs them from the workspace root."""
    write_params(tmp_path, data_source, model_source, protocol)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        status = cli.run("download-data", download_data.main, ["--out", "out/data/raw"])
        return status or cli.run("download-model", download_model.main, ["--out", "out/models/base"])
    finally:
        os.chdir(cwd)


def pin_data(tmp_path, base_url: str, files: dict[str, bytes], protocol="e2e") -> Path:
    """A data pin file (data/upstream.yaml's format) for `files` served under `base_url`."""
    names = {"trainset.csv": "train.csv", "devset.csv": "dev.csv", "testset_w_refs.csv": "test.csv"}
    pins = {names.get(n, n): {"url": f"{base_url}/{n}", "git_blob": git_blob_id(body)} for n, body in files.items()}
    path = tmp_path / "upstream.yaml"
    path.write_text(yaml.safe_dump({protocol: pins}))
    return path


def pin_model(tmp_path, hub="org/tiny", revision=REVISION, sha256=None) -> Path:
    path = tmp_path / "model-pin.yaml"
    path.write_text(yaml.safe_dump({"hub": hub, "revision": revision, **({"sha256": sha256} if sha256 else {})}))
    return path


def leftovers(tmp_path) -> list[str]:
    """Everything under out/ except the (pre-created) parent folders: must be empty after a failure."""
    out = tmp_path / "out"
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.name.startswith("."))


def serve(files: dict[str, tuple[bytes, dict]]):
    """A thread serving `files` (url path -> (body, extra headers)) on 127.0.0.1; returns (server, base url)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, body_too: bool):
            path = self.path.split("?")[0]
            if path not in files:
                self.send_error(404)
                return
            body, headers = files[path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if body_too:
                self.wfile.write(body)

        def do_GET(self):
            self._reply(True)

        def do_HEAD(self):
            self._reply(False)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes: refused


# --- data -----------------------------------------------------------------------------------------------------------

def test_local_data_copied_byte_for_byte(tmp_path, csv_dir, tiny_model):
    assert run_stage(tmp_path, csv_dir, tiny_model) == 0
    for name, out in OUT_NAMES.items():
        assert (tmp_path / "out/data/raw" / out).read_bytes() == (csv_dir / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out/data/raw").iterdir()) == ["dev.csv", "test.csv", "train.csv"]
    assert not [p for p in (tmp_path / "out/data").iterdir() if p.name.startswith(".")]


def test_local_data_accepts_short_names(tmp_path, csv_dir, tiny_model):
    for name, out in OUT_NAMES.items():
        (csv_dir / name).rename(csv_dir / out)
    assert run_stage(tmp_path, csv_dir, tiny_model) == 0
    assert (tmp_path / "out/data/raw/test.csv").read_text() == CSV["testset_w_refs.csv"]


@pytest.mark.parametrize("source", ["nowhere", "file:///data/e2e", "github"])
def test_a_source_that_does_not_exist_names_the_param_and_the_path(tmp_path, tiny_model, capsys, source):
    assert run_stage(tmp_path, source, tiny_model) == 2
    err = capsys.readouterr().err
    assert f"data.source: {source}: no such file or directory" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # validated before any work


def test_missing_data_file_names_param_and_file(tmp_path, csv_dir, tiny_model, capsys):
    (csv_dir / "devset.csv").unlink()
    assert run_stage(tmp_path, csv_dir, tiny_model) == 2
    err = capsys.readouterr().err
    assert "data.source" in err and "devset.csv" in err and str(csv_dir) in err
    assert leftovers(tmp_path) == []


@pytest.fixture
def mirror():
    """The E2E CSVs served on 127.0.0.1 (a stand-in for raw.githubusercontent.com), and a pin file for them."""
    files = {f"/{name}": (text.encode(), {}) for name, text in CSV.items()}
    server, base = serve(files)
    yield files, base
    server.shutdown()


def test_pinned_data_from_a_mirror(tmp_path, mirror, tiny_model):
    files, base = mirror
    pin = pin_data(tmp_path, base, {n: t.encode() for n, t in CSV.items()})
    assert run_stage(tmp_path, pin, tiny_model) == 0
    for name, out in OUT_NAMES.items():
        assert (tmp_path / "out/data/raw" / out).read_bytes() == CSV[name].encode()


def test_pinned_checksum_mismatch_names_file_and_hashes(tmp_path, mirror, tiny_model, capsys):
    files, base = mirror
    pin = pin_data(tmp_path, base, {n: t.encode() for n, t in CSV.items()})
    corrupted = CSV["devset.csv"].replace("Italian", "Italain").encode()
    files["/devset.csv"] = (corrupted, {})
    assert run_stage(tmp_path, pin, tiny_model) == 2
    err = capsys.readouterr().err
    assert "devset.csv" in err and git_blob_id(CSV["devset.csv"].encode()) in err and git_blob_id(corrupted) in err
    assert leftovers(tmp_path) == []


def test_pinned_data_offline_says_what_to_set(tmp_path, tiny_model, capsys):
    pin = pin_data(tmp_path, closed_port_url(), {n: t.encode() for n, t in CSV.items()})
    assert run_stage(tmp_path, pin, tiny_model) == 2
    err = capsys.readouterr().err
    assert "could not reach 127.0.0.1" in err and "set data.source" in err
    assert leftovers(tmp_path) == []


def test_a_pin_file_without_the_protocol_names_the_file(tmp_path, mirror, tiny_model, capsys):
    files, base = mirror
    pin = pin_data(tmp_path, base, {n: t.encode() for n, t in CSV.items()}, protocol="e2e")
    assert run_stage(tmp_path, pin, tiny_model, protocol="authors") == 2
    err = capsys.readouterr().err
    assert f"data.source: {pin}: not a pin file" in err and "'authors'" in err
    assert not (tmp_path / "out").exists()


AUTHORS = {
    "train.txt": "name : Aromi | area : riverside||Aromi is by the river . \n",
    "valid.txt": "name : Zizzi | food : Italian||Zizzi serves Italian food . \n",
    "test.txt": "name : Cotto | price : cheap||Cotto is cheap . \nname : Cotto | price : cheap||Cotto is a cheap place . \n",
}


@pytest.fixture
def authors_mirror(tmp_path):
    """microsoft/LoRA's raw files served on 127.0.0.1, and a pin file naming them with their blob ids."""
    files = {f"/{name}": (text.encode(), {}) for name, text in AUTHORS.items()}
    server, base = serve(files)
    yield files, pin_data(tmp_path, base, {n: t.encode() for n, t in AUTHORS.items()}, protocol="authors")
    server.shutdown()


def test_authors_protocol_fetches_the_authors_files(tmp_path, authors_mirror, tiny_model):
    assert run_stage(tmp_path, authors_mirror[1], tiny_model, protocol="authors") == 0
    out = tmp_path / "out/data/raw"
    assert sorted(p.name for p in out.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    assert (out / "test.txt").read_text() == AUTHORS["test.txt"]


def test_authors_blob_mismatch_names_the_url_and_both_ids(tmp_path, authors_mirror, tiny_model, capsys):
    files, pin = authors_mirror
    corrupted = AUTHORS["valid.txt"].replace("Italian", "Italain").encode()
    files["/valid.txt"] = (corrupted, {})
    assert run_stage(tmp_path, pin, tiny_model, protocol="authors") == 2
    err = capsys.readouterr().err
    assert "valid.txt" in err and git_blob_id(corrupted) in err and git_blob_id(AUTHORS["valid.txt"].encode()) in err
    assert leftovers(tmp_path) == []


def test_authors_protocol_from_a_local_directory_and_a_bad_line(tmp_path, tiny_model, capsys):
    d = tmp_path / "authors"
    d.mkdir()
    for name, text in AUTHORS.items():
        (d / name).write_text(text)
    assert run_stage(tmp_path, d, tiny_model, protocol="authors") == 0
    (d / "valid.txt").write_text("name : Zizzi | food : Italian Zizzi serves Italian food .\n")  # no ||
    (tmp_path / "again").mkdir()
    assert run_stage(tmp_path / "again", d, tiny_model, protocol="authors") == 2
    assert "valid.txt: line 1" in capsys.readouterr().err


def test_unknown_protocol_names_the_param_and_values(tmp_path, csv_dir, tiny_model, capsys):
    assert run_stage(tmp_path, csv_dir, tiny_model, protocol="paper") == 2
    assert "protocol must be one of ['authors', 'e2e']" in capsys.readouterr().err


def test_the_shipped_pins_match_the_shared_copies():
    """data/upstream.yaml pins the files the pipeline fetches; the dev and test files here must match them."""
    if not (SHARED / "e2e").is_dir():
        pytest.skip(f"{SHARED}/e2e absent: no local copy of the E2E dev/test sets to check the pins against")
    pins = yaml.safe_load((ROOT / "data" / "upstream.yaml").read_text())
    for protocol, raw, shared in [("e2e", "dev.csv", "e2e/devset.csv"), ("e2e", "test.csv", "e2e/testset_w_refs.csv"),
                                  ("authors", "valid.txt", "e2e-authors/valid.txt"),
                                  ("authors", "test.txt", "e2e-authors/test.txt")]:
        assert git_blob_id((SHARED / shared).read_bytes()) == pins[protocol][raw]["git_blob"], (protocol, raw)
        assert pins[protocol][raw]["url"].rsplit("/", 1)[1] in (raw, shared.rsplit("/", 1)[1])


def test_git_blob_id_is_gits(tmp_path):
    data = b"name : A||A .\n"
    assert git_blob_id(data) == hashlib.sha1(b"blob 14\x00" + data).hexdigest()
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's well-known empty blob
    (tmp_path / "f").write_bytes(data)
    git = subprocess.run(["git", "hash-object", str(tmp_path / "f")], capture_output=True, text=True)
    assert git.returncode == 0 and git_blob_id(data) == git.stdout.strip()


# --- the model pin --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("revision", ["main", "v1.0", "6dcaa7a", None, "G" * 40])
def test_hub_revision_must_be_commit_sha(tmp_path, csv_dir, revision, capsys):
    assert run_stage(tmp_path, csv_dir, pin_model(tmp_path, revision=revision)) == 2
    assert "model.source" in (err := capsys.readouterr().err) and "revision" in err
    assert not (tmp_path / "out/models").exists()


def test_the_shipped_model_pin_is_gpt2_medium_at_a_commit():
    pin = download_model.read_pin(ROOT / "models" / "gpt2-medium.yaml")
    assert pin["hub"] == "openai-community/gpt2-medium" and len(pin["revision"]) == 40
    assert set(pin["sha256"]) == {"model.safetensors"}


# --- model from a local directory -----------------------------------------------------------------------------------

def test_local_model_copies_three_files_and_identity(tmp_path, csv_dir, tiny_model):
    assert run_stage(tmp_path, csv_dir, tiny_model) == 0
    out = tmp_path / "out/models/base"
    assert sorted(p.name for p in out.iterdir()) == sorted([*download_model.FILES, "identity.json"])
    for name in download_model.FILES:
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes()
    identity = json.loads((out / "identity.json").read_text())
    assert identity == {"name": str(tiny_model), "revision": None,
                        "model_sha256": sha256((tiny_model / "model.safetensors").read_bytes())}


def test_local_model_missing_weights(tmp_path, csv_dir, tiny_model, capsys):
    partial = tmp_path / "partial-model"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (partial / name).write_bytes((tiny_model / name).read_bytes())
    assert run_stage(tmp_path, csv_dir, partial) == 2
    err = capsys.readouterr().err
    assert "model.source" in err and "model.safetensors" in err
    assert not (tmp_path / "out/models/base").exists()


def test_local_model_rejects_non_safetensors(tmp_path, csv_dir, tiny_model, capsys):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    for name in download_model.FILES:
        (bad / name).write_bytes((tiny_model / name).read_bytes())
    (bad / "model.safetensors").write_bytes(b"<html>not found</html>")
    assert run_stage(tmp_path, csv_dir, bad) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out/models/base").exists()


def test_a_tokenizer_that_is_not_json_is_refused(tmp_path, csv_dir, tiny_model, capsys):
    bad = tmp_path / "bad-tokenizer"
    shutil.copytree(tiny_model, bad)
    (bad / "tokenizer.json").write_text("{not json")
    assert run_stage(tmp_path, csv_dir, bad) == 2
    err = capsys.readouterr().err
    assert "model.source" in err and "tokenizer.json" in err
    assert not (tmp_path / "out/models/base").exists()


def test_rerun_replaces_previous_output(tmp_path, csv_dir, tiny_model):
    assert run_stage(tmp_path, csv_dir, tiny_model) == 0
    (tmp_path / "out/data/raw/stale.txt").write_text("from an earlier run")
    assert run_stage(tmp_path, csv_dir, tiny_model) == 0
    assert not (tmp_path / "out/data/raw/stale.txt").exists()
    assert sorted(p.name for p in (tmp_path / "out/data").iterdir()) == ["raw"]


# --- model from the hub (a fake hub on 127.0.0.1, driven through the real huggingface_hub client) -------------------

@pytest.fixture
def fake_hub(monkeypatch, tiny_model):
    """Serves tiny_model as `org/tiny` at REVISION with the hub's headers; model.safetensors's ETag is its sha256."""
    files = {}
    for name in download_model.FILES:
        body = (tiny_model / name).read_bytes()
        etag = sha256(body) if name == "model.safetensors" else hashlib.sha1(body).hexdigest()
        files[f"/org/tiny/resolve/{REVISION}/{name}"] = (body, {"X-Repo-Commit": REVISION, "ETag": f'"{etag}"'})
    server, base = serve(files)
    monkeypatch.setattr(download_model, "HF_ENDPOINT", base)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield files
    server.shutdown()


def test_hub_model_downloads_exactly_the_needed_files(tmp_path, csv_dir, tiny_model, fake_hub):
    assert run_stage(tmp_path, csv_dir, pin_model(tmp_path)) == 0
    out = tmp_path / "out/models/base"
    assert sorted(p.name for p in out.iterdir()) == sorted([*download_model.FILES, "identity.json"])  # no .cache
    for name in download_model.FILES:
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes()
    identity = json.loads((out / "identity.json").read_text())
    assert identity == {"name": "org/tiny", "revision": REVISION,
                        "model_sha256": sha256((tiny_model / "model.safetensors").read_bytes())}
    assert sorted(p.name for p in (tmp_path / "out/models").iterdir()) == ["base"]  # no scratch left


def test_hub_sha256_mismatch(tmp_path, csv_dir, tiny_model, fake_hub, capsys):
    key = f"/org/tiny/resolve/{REVISION}/model.safetensors"
    body, headers = fake_hub[key]
    fake_hub[key] = (body, {**headers, "ETag": f'"{"0" * 64}"'})
    assert run_stage(tmp_path, csv_dir, pin_model(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "0" * 64 in err and sha256(body) in err
    assert not (tmp_path / "out/models/base").exists()


def test_hub_pinned_sha256_mismatch(tmp_path, csv_dir, fake_hub, capsys):
    assert run_stage(tmp_path, csv_dir, pin_model(tmp_path, sha256={"model.safetensors": "f" * 64})) == 2
    err = capsys.readouterr().err
    assert "pinned" in err and "f" * 64 in err
    assert not (tmp_path / "out/models/base").exists()


def test_hub_offline_says_what_to_set(tmp_path, csv_dir, monkeypatch, capsys):
    monkeypatch.setattr(download_model, "HF_ENDPOINT", closed_port_url())
    assert run_stage(tmp_path, csv_dir, pin_model(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "could not reach the Hugging Face hub" in err and "set model.source" in err
    assert not (tmp_path / "out/models/base").exists()


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json"])  # the HEAD call / hf_hub_download
def test_hub_unknown_file_is_not_reported_as_offline(tmp_path, csv_dir, fake_hub, missing, capsys):
    del fake_hub[f"/org/tiny/resolve/{REVISION}/{missing}"]
    assert run_stage(tmp_path, csv_dir, pin_model(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "hub refused" in err and "could not reach" not in err
