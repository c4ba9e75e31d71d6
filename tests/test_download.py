"""The download stage, hermetically: local sources, a GitHub mirror and a fake hub on 127.0.0.1, tiny models."""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from stages.lib import cli
from stages import download

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
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
    """A 1-layer GPT-2 saved as safetensors, with a minimal tokenizer.json built by `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("tiny-gpt2")
    cfg = GPT2Config(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    vocab = {w: i for i, w in enumerate(["<unk>", "the", "eagle", "serves", "french", "food"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    assert (d / "model.safetensors").is_file() and not (d / "pytorch_model.bin").exists()
    return d


@pytest.fixture
def csv_dir(tmp_path) -> Path:
    d = tmp_path / "e2e"
    d.mkdir()
    for name, text in CSV.items():
        (d / name).write_text(text)
    return d


def run_stage(tmp_path, data_source, model_name, revision=REVISION, protocol="e2e") -> int:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"protocol": protocol, "data": {"source": str(data_source)},
                                      "model": {"name": str(model_name), "revision": revision}}))
    return cli.run("download", download.main, ["--data-out", str(tmp_path / "out/data/raw"), "--model-out",
                          str(tmp_path / "out/models/pretrained"), "--params", str(params)])


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


def test_missing_data_dir_names_param(tmp_path, tiny_model, capsys):
    assert run_stage(tmp_path, tmp_path / "nowhere", tiny_model) == 2
    assert "data.source" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # validated before any work


def test_missing_data_file_names_param_and_file(tmp_path, csv_dir, tiny_model, capsys):
    (csv_dir / "devset.csv").unlink()
    assert run_stage(tmp_path, csv_dir, tiny_model) == 2
    err = capsys.readouterr().err
    assert "data.source" in err and "devset.csv" in err and str(csv_dir) in err
    assert leftovers(tmp_path) == []


@pytest.fixture
def github_mirror(monkeypatch):
    files = {f"/{name}": (text.encode(), {}) for name, text in CSV.items()}
    server, base = serve(files)
    monkeypatch.setattr(download, "E2E_URL", base + "/{name}")
    monkeypatch.setattr(download, "E2E_BLOB_IDS", {n: download.git_blob_id(t.encode()) for n, t in CSV.items()})
    yield files
    server.shutdown()


def test_github_source_from_mirror(tmp_path, github_mirror, tiny_model):
    assert run_stage(tmp_path, "github", tiny_model) == 0
    for name, out in OUT_NAMES.items():
        assert (tmp_path / "out/data/raw" / out).read_bytes() == CSV[name].encode()


def test_github_checksum_mismatch_names_file_and_hashes(tmp_path, github_mirror, tiny_model, capsys):
    corrupted = CSV["devset.csv"].replace("Italian", "Italain").encode()
    github_mirror["/devset.csv"] = (corrupted, {})
    assert run_stage(tmp_path, "github", tiny_model) == 2
    err = capsys.readouterr().err
    assert "devset.csv" in err
    assert download.E2E_BLOB_IDS["devset.csv"] in err and download.git_blob_id(corrupted) in err
    assert leftovers(tmp_path) == []


def test_github_offline_names_data_source(tmp_path, monkeypatch, tiny_model, capsys):
    monkeypatch.setattr(download, "E2E_URL", closed_port_url() + "/{name}")
    assert run_stage(tmp_path, "github", tiny_model) == 2
    err = capsys.readouterr().err
    assert "could not reach github.com" in err and "set data.source" in err
    assert leftovers(tmp_path) == []


AUTHORS = {
    "train.txt": "name : Aromi | area : riverside||Aromi is by the river . \n",
    "valid.txt": "name : Zizzi | food : Italian||Zizzi serves Italian food . \n",
    "test.txt": "name : Cotto | price : cheap||Cotto is cheap . \nname : Cotto | price : cheap||Cotto is a cheap place . \n",
}


@pytest.fixture
def authors_mirror(monkeypatch):
    """microsoft/LoRA's raw files at the pinned commit, served on 127.0.0.1, with their blob ids pinned."""
    files = {f"/{name}": (text.encode(), {}) for name, text in AUTHORS.items()}
    server, base = serve(files)
    monkeypatch.setattr(download.authors_data, "RAW_URLS", {n: f"{base}/{n}" for n in AUTHORS})
    monkeypatch.setattr(download.authors_data, "BLOB_IDS", {n: download.git_blob_id(t.encode())
                                                            for n, t in AUTHORS.items()})
    yield files
    server.shutdown()


def test_authors_protocol_fetches_the_authors_files(tmp_path, authors_mirror, tiny_model):
    assert run_stage(tmp_path, "github", tiny_model, protocol="authors") == 0
    out = tmp_path / "out/data/raw"
    assert sorted(p.name for p in out.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    assert (out / "test.txt").read_text() == AUTHORS["test.txt"]


def test_authors_blob_mismatch_names_the_url_and_both_ids(tmp_path, authors_mirror, tiny_model, capsys):
    corrupted = AUTHORS["valid.txt"].replace("Italian", "Italain").encode()
    authors_mirror["/valid.txt"] = (corrupted, {})
    assert run_stage(tmp_path, "github", tiny_model, protocol="authors") == 2
    err = capsys.readouterr().err
    assert "valid.txt" in err and download.git_blob_id(corrupted) in err
    assert download.authors_data.BLOB_IDS["valid.txt"] in err
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


def test_pinned_blob_ids_match_shared_copies():
    if not (SHARED / "e2e").is_dir():
        pytest.skip(f"{SHARED}/e2e absent: no local copy of the E2E dev/test sets to check the pins against")
    for name in ("devset.csv", "testset_w_refs.csv"):
        assert download.git_blob_id((SHARED / "e2e" / name).read_bytes()) == download.E2E_BLOB_IDS[name]


def test_git_blob_id_matches_git():
    assert download.git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # `git hash-object /dev/null`


# --- parameters -----------------------------------------------------------------------------------------------------

def test_unknown_data_source_rejected(tmp_path, tiny_model, capsys):
    assert run_stage(tmp_path, "gitlab", tiny_model) == 2
    assert "data.source" in capsys.readouterr().err


@pytest.mark.parametrize("revision", ["main", "v1.0", "6dcaa7a", None, "G" * 40])
def test_hub_revision_must_be_commit_sha(tmp_path, csv_dir, revision, capsys):
    assert run_stage(tmp_path, csv_dir, "openai-community/gpt2-medium", revision) == 2
    assert "model.revision" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- model from a local directory -----------------------------------------------------------------------------------

def test_local_model_copies_three_files_and_identity(tmp_path, csv_dir, tiny_model):
    assert run_stage(tmp_path, csv_dir, tiny_model, revision="ignored") == 0
    out = tmp_path / "out/models/pretrained"
    assert sorted(p.name for p in out.iterdir()) == sorted([*download.MODEL_FILES, "identity.json"])
    for name in download.MODEL_FILES:
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
    assert "model.name" in err and "model.safetensors" in err
    assert leftovers(tmp_path) == []  # the data output, already built, is not published either


def test_local_model_rejects_non_safetensors(tmp_path, csv_dir, tiny_model, capsys):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    for name in download.MODEL_FILES:
        (bad / name).write_bytes((tiny_model / name).read_bytes())
    (bad / "model.safetensors").write_bytes(b"<html>not found</html>")
    assert run_stage(tmp_path, csv_dir, bad) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


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
    for name in download.MODEL_FILES:
        body = (tiny_model / name).read_bytes()
        etag = sha256(body) if name == "model.safetensors" else hashlib.sha1(body).hexdigest()
        files[f"/org/tiny/resolve/{REVISION}/{name}"] = (body, {"X-Repo-Commit": REVISION, "ETag": f'"{etag}"'})
    server, base = serve(files)
    monkeypatch.setattr(download, "HF_ENDPOINT", base)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield files
    server.shutdown()


def test_hub_model_downloads_exactly_the_needed_files(tmp_path, csv_dir, tiny_model, fake_hub):
    assert run_stage(tmp_path, csv_dir, "org/tiny") == 0
    out = tmp_path / "out/models/pretrained"
    assert sorted(p.name for p in out.iterdir()) == sorted([*download.MODEL_FILES, "identity.json"])  # no .cache
    for name in download.MODEL_FILES:
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes()
    identity = json.loads((out / "identity.json").read_text())
    assert identity == {"name": "org/tiny", "revision": REVISION,
                        "model_sha256": sha256((tiny_model / "model.safetensors").read_bytes())}
    assert sorted(p.name for p in (tmp_path / "out/models").iterdir()) == ["pretrained"]  # no scratch left


def test_hub_sha256_mismatch(tmp_path, csv_dir, tiny_model, fake_hub, capsys):
    key = f"/org/tiny/resolve/{REVISION}/model.safetensors"
    body, headers = fake_hub[key]
    fake_hub[key] = (body, {**headers, "ETag": f'"{"0" * 64}"'})
    assert run_stage(tmp_path, csv_dir, "org/tiny") == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "0" * 64 in err and sha256(body) in err
    assert leftovers(tmp_path) == []


def test_hub_pinned_sha256_mismatch(tmp_path, csv_dir, fake_hub, monkeypatch, capsys):
    monkeypatch.setattr(download, "KNOWN_MODEL_SHA256", {("org/tiny", REVISION): "f" * 64})
    assert run_stage(tmp_path, csv_dir, "org/tiny") == 2
    err = capsys.readouterr().err
    assert "pinned" in err and "f" * 64 in err
    assert leftovers(tmp_path) == []


def test_hub_offline_names_model_name(tmp_path, csv_dir, monkeypatch, capsys):
    monkeypatch.setattr(download, "HF_ENDPOINT", closed_port_url())
    assert run_stage(tmp_path, csv_dir, "org/tiny") == 2
    err = capsys.readouterr().err
    assert "could not reach the Hugging Face hub" in err and "set model.name" in err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json"])  # the HEAD call / hf_hub_download
def test_hub_unknown_file_is_not_reported_as_offline(tmp_path, csv_dir, fake_hub, missing, capsys):
    del fake_hub[f"/org/tiny/resolve/{REVISION}/{missing}"]
    assert run_stage(tmp_path, csv_dir, "org/tiny") == 2
    err = capsys.readouterr().err
    assert "hub refused" in err and "could not reach" not in err
    assert leftovers(tmp_path) == []
