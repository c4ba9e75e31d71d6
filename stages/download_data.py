"""download-data: the protocol's three E2E files into data/raw, fetched by pin or copied from a local directory.

`data.source` is either a pin file (data/upstream.yaml: each file's URL and git blob id, per protocol) or a
directory holding the files (air-gapped machines; the demo's data/sample). Either way dvc.yaml tracks it, so an
edit reruns this stage. Every file is parsed as preprocess will read it before anything is published.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from stages.lib import cli
from stages.lib import params as P
from stages.lib.cli import InputError
from stages.lib.outputs import atomic_dir, check_writable, exclusive, git_blob_id
from stages.lib.protocols import PROTOCOLS, Protocol

TIMEOUT_S = 30  # per connection attempt / read: an unreachable host fails fast instead of hanging the pipeline
HELP = ("set data.source in params.yaml to a local directory holding the protocol's files (train.txt, valid.txt, "
        "test.txt for authors; trainset.csv, devset.csv, testset_w_refs.csv for e2e)")


def log(msg: str) -> None:
    print(f"download-data: {msg}", file=sys.stderr, flush=True)


def config(p: P.Params) -> dict:
    return {"protocol": p.protocol, "source": p.data.source}


def read_pins(path: Path, protocol: Protocol) -> dict[str, tuple[str, str]]:
    """{raw file name: (url, git blob id)} for `protocol` from a pin file; errors name the file and entry."""
    try:
        pins = yaml.safe_load(path.read_text(encoding="utf-8"))[protocol.name]
        files = {name: (pins[name]["url"], pins[name]["git_blob"]) for name, _ in protocol.files.values()}
    except (OSError, ValueError, yaml.YAMLError, TypeError, KeyError) as e:
        raise InputError(f"data.source: {path}: not a pin file with url and git_blob for each of "
                         f"{[n for n, _ in protocol.files.values()]} under {protocol.name!r} ({e!r})") from None
    for name, (url, blob) in files.items():
        if not (isinstance(url, str) and isinstance(blob, str) and len(blob) == 40):
            raise InputError(f"data.source: {path}: {protocol.name}.{name}: expected a url and a 40-hex git_blob")
    return files


def fetch(url: str) -> bytes:
    """The body at `url`; ConnectionError when the host cannot be reached, InputError on an HTTP error."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as e:  # reached the server, which said no: not an offline problem
        raise InputError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:  # DNS failure, refused, timeout
        raise ConnectionError(f"{url}: {getattr(e, 'reason', e)}") from None


def fetch_pinned(staging: Path, pins: dict[str, tuple[str, str]], protocol: Protocol) -> None:
    for name, (url, expected) in pins.items():
        log(f"fetching {url}")
        try:
            data = fetch(url)
        except ConnectionError as e:
            raise InputError(f"could not reach {url.split('/')[2]} to download the E2E data ({e}); {HELP}") from None
        actual = git_blob_id(data)
        if actual != expected:
            raise InputError(f"{url}: checksum mismatch: expected git blob id {expected}, got {actual}")
        (staging / name).write_bytes(data)
        try:
            log(f"{name}: {len(protocol.read(staging / name)):,} rows")
        except InputError as e:  # name the URL, not the temporary file
            raise InputError(str(e).replace(str(staging / name), url)) from None


def copy_local(staging: Path, source: Path, protocol: Protocol) -> None:
    """Copied as they are, after parsing: a malformed file fails now, naming its line."""
    for name, accepted in protocol.files.values():
        found = next((source / n for n in accepted if (source / n).is_file()), None)
        if found is None:
            raise InputError(f"data.source: {source} has no {' or '.join(accepted)} (protocol {protocol.name})")
        log(f"{found}: {len(protocol.read(found)):,} rows")
        shutil.copyfile(found, staging / name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the protocol's three files")
    args = ap.parse_args(argv)
    cfg = config(P.read())
    protocol, source = PROTOCOLS[cfg["protocol"]], Path(cfg["source"])
    if not source.exists():
        raise InputError(f"data.source: {cfg['source']}: no such file or directory")
    pins = read_pins(source, protocol) if source.is_file() else None  # validated before any work
    check_writable(args.out)
    with exclusive(args.out), atomic_dir(args.out) as staging:
        if pins is not None:
            fetch_pinned(staging, pins, protocol)
        else:
            copy_local(staging, source, protocol)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("download-data", main))
