"""DVC stage `download`: the E2E dataset and the pretrained base model, pinned and verified.

    python -m stages.download --data-out data/raw --model-out models/pretrained

Reads `data.source`, `model.name` and `model.revision` from ./params.yaml. Each source is either the pinned
upstream (GitHub release / Hugging Face hub commit) or a local directory, so the pipeline also runs offline.
Each output directory is built in a temp sibling and renamed into place only once complete and verified.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from stages.lib import authors_data, cli, gpt2
from stages.lib import params as P
from stages.lib.authors_data import git_blob_id  # the id git gives a file's content (also for the CSVs)
from stages.lib.cli import InputError
from stages.lib.e2e import read_e2e_csv
from stages.lib.outputs import atomic_dir, check_writable, sha256_file

# The three CSVs are fetched one by one from raw.githubusercontent.com at the release tag rather than the release
# zip: raw files are the git blobs byte for byte, so their git blob ids (below) pin the content exactly, whereas
# GitHub builds archive zips on demand and their bytes are not guaranteed stable; it also skips unzipping.
E2E_URL = "https://raw.githubusercontent.com/tuetschek/e2e-dataset/v1.0.0/{name}"
# git blob ids (sha1 of b"blob <size>\0" + content) in tuetschek/e2e-dataset at commit ab0d967 (release v1.0.0).
E2E_BLOB_IDS = {
    "trainset.csv": "fa3a5e1124d2aa0d768881e38f8ee73e63d5880d",  # 42,061 rows
    "devset.csv": "c45950a0771c769d787a33fdf56439cb890005d7",  # 4,672 rows
    "testset_w_refs.csv": "86733864c96dc18cbaa5f18042356296ef679302",  # 4,693 rows, 630 MRs
}
# output name -> accepted source names (upstream name first; the short names let a sample ship as-is).
DATA_FILES = {
    "train.csv": ("trainset.csv", "train.csv"),
    "dev.csv": ("devset.csv", "dev.csv"),
    "test.csv": ("testset_w_refs.csv", "test.csv"),
}
# Only safetensors weights: a pickle checkpoint (pytorch_model.bin) can run code when loaded.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# A second, hub-independent pin of the weights for the default model: from a public manifest of
# openai-community/gpt2-medium at this commit (ALLPROTO/core-lm-cross-model-lab models.json, 1,519,984,962 bytes)
# whose config.json and tokenizer.json hashes match our copies in ../shared/gpt2. Not yet checked against the hub.
KNOWN_MODEL_SHA256 = {
    ("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da"):
        "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
}
HF_ENDPOINT: str | None = None  # None: the hub client's default (honours the HF_ENDPOINT environment variable)
TIMEOUT_S = 30  # per connection attempt / read; an unreachable host fails fast instead of hanging the pipeline
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
PROTOCOLS = ("authors", "e2e")
# protocol "authors": the LoRA authors' own E2E text files (microsoft/LoRA examples/NLG/data/e2e at a pinned commit).
AUTHORS_FILES = {name: (name,) for name in authors_data.SPLITS}
DATA_HELP = ("set data.source in params.yaml to a local directory holding trainset.csv, devset.csv and "
             "testset_w_refs.csv (protocol e2e) or train.txt, valid.txt and test.txt (protocol authors)")
MODEL_HELP = ("set model.name in params.yaml to a local directory holding config.json, model.safetensors and "
              "tokenizer.json")


class DownloadError(InputError):
    """A source is unreachable, missing or fails verification; the message names the parameter or file."""


def log(msg: str) -> None:
    print(f"download: {msg}", file=sys.stderr, flush=True)


def load_params(path: Path) -> dict:
    """The parameters, validated before any work so a typo fails in a second, not after a 1.5 GB download."""
    params = P.load(path)
    P.warn_unknown(params, "data", ("source",))
    P.warn_unknown(params, "model", ("name", "revision"))
    protocol = P.choice(params, "protocol", PROTOCOLS)
    source = P.get(params, "data.source")
    if not isinstance(source, str) or (source != "github" and not Path(source).is_dir()):
        raise DownloadError(f"data.source: {source!r} is neither 'github' nor an existing directory")
    name = P.get(params, "model.name")
    revision = params["model"].get("revision")
    if not isinstance(name, str) or not name:
        raise DownloadError(f"model.name: {name!r} is neither a hub model id nor a local directory")
    if Path(name).is_dir():
        revision = None  # a local directory has no hub revision; identity.json records null
    elif not (isinstance(revision, str) and _COMMIT_SHA.fullmatch(revision)):
        # Branch names and tags move; only a full commit sha names fixed bytes.
        raise DownloadError(f"model.revision: {revision!r} is not a 40-hex commit sha (required for hub model {name!r})")
    return {"protocol": protocol, "data_source": source, "model_name": name, "model_revision": revision}


def fetch(url: str) -> bytes:
    """The body at `url`; ConnectionError when the host cannot be reached, DownloadError on an HTTP error."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as e:  # reached the server, which said no: not an offline problem
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:  # DNS failure, refused, timeout
        raise ConnectionError(f"{url}: {getattr(e, 'reason', e)}") from None


def stage_data_github(staging: Path, protocol: str) -> None:
    if protocol == "authors":
        files = {name: (authors_data.RAW_URLS[name], authors_data.BLOB_IDS[name]) for name in authors_data.SPLITS}
    else:
        files = {out: (E2E_URL.format(name=up), E2E_BLOB_IDS[up]) for out, (up, _) in DATA_FILES.items()}
    for out_name, (url, expected) in files.items():
        log(f"fetching {url}")
        try:
            data = fetch(url)
        except ConnectionError as e:
            raise DownloadError(f"could not reach github.com to download the E2E dataset ({e}); {DATA_HELP}") from None
        actual = git_blob_id(data)
        if actual != expected:
            raise DownloadError(f"{url}: checksum mismatch: expected git blob id {expected}, got {actual}")
        (staging / out_name).write_bytes(data)
        try:
            log(f"data: {out_name} {len(read_rows(staging / out_name, protocol)):,} rows")
        except InputError as e:  # name the URL, not the temporary file
            raise DownloadError(str(e).replace(str(staging / out_name), url)) from None


def read_rows(path: Path, protocol: str) -> list[tuple[str, str]]:
    """Parse a data file as preprocess will, so that a malformed one fails here, naming its file and line."""
    return authors_data.read_authors_file(path) if protocol == "authors" else read_e2e_csv(path)


def stage_data_local(staging: Path, source: Path, protocol: str) -> None:
    # A local copy is parsed, not blob-checked: the shipped sample is a cut of the authors' files.
    for out_name, names in (AUTHORS_FILES if protocol == "authors" else DATA_FILES).items():
        found = next((source / n for n in names if (source / n).is_file()), None)
        if found is None:
            raise DownloadError(f"data.source: {source} has no {' or '.join(names)} (protocol {protocol})")
        log(f"data: {found} {len(read_rows(found, protocol)):,} rows")  # a malformed file fails now, named
        shutil.copyfile(found, staging / out_name)


def check_safetensors(path: Path) -> None:
    """Cheap format check (8-byte header length, then a JSON header) that catches an HTML error page or a pickle."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
            json.loads(f.read(n) if 0 < n < 100_000_000 else b"")
        except ValueError:
            raise DownloadError(f"{path}: not a safetensors file") from None


def stage_model_local(staging: Path, source: Path) -> None:
    for name in MODEL_FILES:
        if not (source / name).is_file():
            raise DownloadError(f"model.name: {source} has no {name}")
        shutil.copyfile(source / name, staging / name)


def stage_model_hub(staging: Path, name: str, revision: str) -> None:
    import httpx2  # the hub client's HTTP library; its TransportError means "could not connect / timed out"
    import huggingface_hub as hf
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, LocalEntryNotFoundError

    answered = (HfHubHTTPError, FileMetadataError)  # the hub replied: a wrong id, revision or file, not offline
    # The hub's own scratch files (.cache/huggingface/ under local_dir) stay in this sibling, out of the output.
    scratch = Path(tempfile.mkdtemp(prefix=f".{staging.name}.hub-", dir=staging.parent))
    try:
        # An LFS/Xet file's ETag is its sha256 (huggingface/huggingface_hub#3018). One HEAD, no retries, comes
        # first so that an offline machine fails in a second, before hf_hub_download's retry loop.
        url = hf.hf_hub_url(name, "model.safetensors", revision=revision, endpoint=HF_ENDPOINT)
        meta = hf.get_hf_file_metadata(url, timeout=TIMEOUT_S, endpoint=HF_ENDPOINT)
        expected = (meta.etag or "").lower()
        if not _SHA256.fullmatch(expected):
            raise DownloadError(f"{name}@{revision}: model.safetensors has no sha256 ETag (got {meta.etag!r})")
        if meta.commit_hash != revision:
            raise DownloadError(f"model.revision: hub resolved {revision} to commit {meta.commit_hash}")
        for file in MODEL_FILES:
            log(f"fetching {name}@{revision[:12]} {file}")
            path = hf.hf_hub_download(name, file, revision=revision, local_dir=scratch, etag_timeout=TIMEOUT_S,
                                      endpoint=HF_ENDPOINT)
            os.replace(path, staging / file)  # same filesystem: a rename, not a 1.5 GB copy
    except (httpx2.TransportError, ConnectionError, LocalEntryNotFoundError, *answered) as e:
        # hf_hub_download wraps every failed lookup in LocalEntryNotFoundError: its cause tells whether the hub
        # answered or could not be reached at all (ConnectionError covers HF_HUB_OFFLINE=1).
        cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ else e
        if isinstance(cause, answered):
            raise DownloadError(f"model.name/model.revision: hub refused {name}@{revision}: {cause}") from None
        raise DownloadError(f"could not reach the Hugging Face hub to download {name} ({e}); {MODEL_HELP}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    actual = sha256_file(staging / "model.safetensors")
    for what, want in (("hub ETag", expected), ("pinned", KNOWN_MODEL_SHA256.get((name, revision), actual))):
        if actual != want:
            raise DownloadError(f"model.safetensors: sha256 mismatch ({what}): expected {want}, got {actual}")


def fill_model(staging: Path, name: str, revision: str | None) -> None:
    if revision is None:
        stage_model_local(staging, Path(name))
    else:
        stage_model_hub(staging, name, revision)
    check_safetensors(staging / "model.safetensors")
    try:  # every weight loads and is finite, and config.json is a GPT-2 config: checked before publishing
        gpt2.load_model(staging)
    except InputError as e:
        raise DownloadError(f"model.name: {name}: {str(e).replace(str(staging), 'the model')}") from None
    identity = {"name": name, "revision": revision, "model_sha256": sha256_file(staging / "model.safetensors")}
    (staging / "identity.json").write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    log(f"model: {name} sha256 {identity['model_sha256']}")


def run(params: dict, data_out: Path, model_out: Path) -> None:
    # Nested: a model failure discards the finished data too, so the stage leaves both outputs or neither.
    with atomic_dir(data_out) as data, atomic_dir(model_out) as model:
        source = params["data_source"]
        if source == "github":
            stage_data_github(data, params["protocol"])
        else:
            stage_data_local(data, Path(source), params["protocol"])
        fill_model(model, params["model_name"], params["model_revision"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-out", type=Path, required=True, help="directory for train.csv, dev.csv, test.csv")
    ap.add_argument("--model-out", type=Path, required=True, help="directory for the base model and identity.json")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = load_params(args.params)
    for path in (args.data_out, args.model_out):
        check_writable(path)
    run(params, args.data_out, args.model_out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("download", main))
