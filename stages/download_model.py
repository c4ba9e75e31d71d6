"""download-model: the pretrained base into models/base, fetched by pin from the hub or copied from a directory.

`model.source` is either a pin file (models/gpt2-medium.yaml: a hub repository, a commit, the weights' sha256) or a
directory holding config.json, model.safetensors and tokenizer.json. Either way dvc.yaml tracks it, so an edit
reruns this stage. What is published has been verified: the config parses, the tokenizer loads, every weight the
config names is present with its shape, and finite; identity.json records what the model is.
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
from pathlib import Path

import yaml

from stages.lib import cli, gpt2
from stages.lib import params as P
from stages.lib.cli import InputError
from stages.lib.outputs import atomic_dir, check_writable, exclusive, sha256_file

# Only safetensors weights: a pickle checkpoint (pytorch_model.bin) can run code when loaded.
FILES = ("config.json", "model.safetensors", "tokenizer.json")
HF_ENDPOINT: str | None = None  # None: the hub client's default (honours the HF_ENDPOINT environment variable)
TIMEOUT_S = 30
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
HELP = "set model.source in params.yaml to a local directory holding config.json, model.safetensors, tokenizer.json"


def log(msg: str) -> None:
    print(f"download-model: {msg}", file=sys.stderr, flush=True)


def config(p: P.Params) -> dict:
    return {"source": p.model.source}


def read_pin(path: Path) -> dict:
    """{hub, revision, sha256: {file: hex}} from a pin file; errors name the file and the entry."""
    try:
        pin = yaml.safe_load(path.read_text(encoding="utf-8"))
        hub, revision, sums = pin["hub"], pin["revision"], pin.get("sha256") or {}
    except (OSError, ValueError, yaml.YAMLError, TypeError, KeyError) as e:
        raise InputError(f"model.source: {path}: not a pin file with hub and revision ({e!r})") from None
    if not (isinstance(hub, str) and hub.count("/") == 1):
        raise InputError(f"model.source: {path}: hub: {hub!r} is not a hub repository id (owner/name)")
    if not (isinstance(revision, str) and _COMMIT.fullmatch(revision)):
        # Branch names and tags move; only a full commit sha names fixed bytes.
        raise InputError(f"model.source: {path}: revision: {revision!r} is not a 40-hex commit sha")
    bad = [f for f, h in sums.items() if f not in FILES or not (isinstance(h, str) and _SHA256.fullmatch(h))]
    if bad:
        raise InputError(f"model.source: {path}: sha256.{bad[0]}: expected one of {FILES} with a 64-hex sha256")
    return {"hub": hub, "revision": revision, "sha256": sums}


def copy_local(staging: Path, source: Path) -> None:
    for name in FILES:
        if not (source / name).is_file():
            raise InputError(f"model.source: {source} has no {name}")
        shutil.copyfile(source / name, staging / name)


def fetch_hub(staging: Path, pin: dict) -> None:
    import httpx2  # the hub client's HTTP library; its TransportError means "could not connect / timed out"
    import huggingface_hub as hf
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, LocalEntryNotFoundError

    name, revision = pin["hub"], pin["revision"]
    answered = (HfHubHTTPError, FileMetadataError)  # the hub replied: a wrong id, revision or file, not offline
    # The hub's own scratch files (.cache/huggingface/ under local_dir) stay in this sibling, out of the output.
    scratch = Path(tempfile.mkdtemp(prefix=f".{staging.name}.hub-", dir=staging.parent))
    try:
        # An LFS/Xet file's ETag is its sha256 (huggingface/huggingface_hub#3018). One HEAD, no retries, comes
        # first so that an offline machine fails in a second, before hf_hub_download's retry loop.
        url = hf.hf_hub_url(name, "model.safetensors", revision=revision, endpoint=HF_ENDPOINT)
        meta = hf.get_hf_file_metadata(url, timeout=TIMEOUT_S, endpoint=HF_ENDPOINT)
        etag = (meta.etag or "").lower()
        if not _SHA256.fullmatch(etag):
            raise InputError(f"{name}@{revision}: model.safetensors has no sha256 ETag (got {meta.etag!r})")
        if meta.commit_hash != revision:
            raise InputError(f"model.source: hub resolved {revision} to commit {meta.commit_hash}")
        for file in FILES:
            log(f"fetching {name}@{revision[:12]} {file}")
            path = hf.hf_hub_download(name, file, revision=revision, local_dir=scratch, etag_timeout=TIMEOUT_S,
                                      endpoint=HF_ENDPOINT)
            os.replace(path, staging / file)  # same filesystem: a rename, not a 1.5 GB copy
    except (httpx2.TransportError, ConnectionError, LocalEntryNotFoundError, *answered) as e:
        # hf_hub_download wraps every failed lookup in LocalEntryNotFoundError: its cause tells whether the hub
        # answered or could not be reached at all (ConnectionError covers HF_HUB_OFFLINE=1).
        cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ else e
        if isinstance(cause, answered):
            raise InputError(f"model.source: hub refused {name}@{revision}: {cause}") from None
        raise InputError(f"could not reach the Hugging Face hub to download {name} ({e}); {HELP}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for file, want, what in [("model.safetensors", etag, "hub ETag"),
                             *((f, h, "pinned") for f, h in sorted(pin["sha256"].items()))]:
        actual = sha256_file(staging / file)
        if actual != want:
            raise InputError(f"{file}: sha256 mismatch ({what}): expected {want}, got {actual}")


def check_safetensors(path: Path) -> None:
    """Cheap format check (8-byte header length, then a JSON header) that catches an HTML error page or a pickle."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
            json.loads(f.read(n) if 0 < n < 100_000_000 else b"")
        except ValueError:
            raise InputError(f"{path}: not a safetensors file") from None


def verify(staging: Path, source: str) -> None:
    """What download-model publishes loads: config, tokenizer, every weight present and finite."""
    check_safetensors(staging / "model.safetensors")
    try:
        gpt2.load_tokenizer(staging / "tokenizer.json")
        gpt2.load_model(staging)
    except InputError as e:
        raise InputError(f"model.source: {source}: {str(e).replace(str(staging), 'the model')}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the model files and identity.json")
    args = ap.parse_args(argv)
    given = config(P.read())["source"]
    source = Path(given)
    if not source.exists():
        raise InputError(f"model.source: {given}: no such file or directory")
    pin = read_pin(source) if source.is_file() else None  # validated before a 1.5 GB download
    check_writable(args.out)
    with exclusive(args.out), atomic_dir(args.out) as staging:
        if pin is None:
            copy_local(staging, source)
        else:
            fetch_hub(staging, pin)
        verify(staging, str(source))
        identity = {"name": pin["hub"] if pin else str(source), "revision": pin["revision"] if pin else None,
                    "model_sha256": sha256_file(staging / "model.safetensors")}
        (staging / "identity.json").write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        log(f"{identity['name']}: model.safetensors sha256 {identity['model_sha256']} (verified)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("download-model", main))
