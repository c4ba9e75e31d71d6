"""Write .dvc/plots/offline.html: DVC's plots page with Vega inlined, so `dvc plots show` renders with no network.

DVC's default page (dvc_render/html.py) loads vega, vega-lite and vega-embed from cdn.jsdelivr.net, so DVCLive's
curves stay blank offline. This template has the same placeholders but no `{scripts}`: the three libraries are
inlined instead. They are taken from the panel 1.4.5 wheel on PyPI (panel/dist/bundled/vegaplot/, the UMD builds
jsdelivr serves), every file checked by its SHA-256:

    pip download --no-deps panel==1.4.5 -d /tmp/wheel && python scripts/vendor_vega.py /tmp/wheel/panel-1.4.5-*.whl

Dev tooling: the project ships the written template (.dvc/plots/PROVENANCE.md), never runs this.
"""
from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

WHEEL_SHA256 = "a6dbddd65e9e68c54a9b683f103b79b48fcea5dd9f463b81a783ea11520fe9cb"  # panel-1.4.5-py3-none-any.whl
# Load order matters: vega-lite and vega-embed find `vega` (and `vegaLite`) on the global object.
LIBS = [  # (member of the wheel, version in the file, SHA-256)
    ("panel/dist/bundled/vegaplot/vega@5", "vega 5.30.0",
     "e432c751a6363f4a61da62920cc7d7ebd13cf09d82949f8f486248f8071dc3ce"),
    ("panel/dist/bundled/vegaplot/vega-lite@5", "vega-lite 5.20.1",
     "cfaa9b39c9dc6ba8749d81dde236cb9d89938978df400640adaf934a790cfae7"),
    ("panel/dist/bundled/vegaplot/vega-embed@6", "vega-embed 6.26.0",
     "072c054f2a6310725e038c38a71e00052705e31835632462c9717a23a384e895"),
]
OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"
HEAD = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- %s inlined, unchanged (BSD-3-Clause, Copyright (c) University of Washington Interactive Data Lab; see
         PROVENANCE.md beside this file): DVC's default page loads them from a CDN. -->
"""
TAIL = """    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    wheel = Path(argv[0])
    if sha256(wheel.read_bytes()) != WHEEL_SHA256:
        print(f"vendor_vega: {wheel}: SHA-256 differs from panel 1.4.5's", file=sys.stderr)
        return 1
    page = HEAD % ", ".join(version for _, version, _ in LIBS)
    with zipfile.ZipFile(wheel) as z:
        for member, version, digest in LIBS:
            code = z.read(member)
            if sha256(code) != digest:
                print(f"vendor_vega: {member}: SHA-256 differs from the pinned {version}", file=sys.stderr)
                return 1
            text = code.decode("utf-8")
            # Inline code must not end the <script> element or hold one of DVC's placeholders.
            assert "</script" not in text.lower() and not any(
                "{" + p + "}" in text for p in ("scripts", "plot_divs", "refresh_tag")), member
            page += f"    <script>{text}</script>\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(page + TAIL, encoding="utf-8")
    print(f"vendor_vega: {OUT} ({OUT.stat().st_size:,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
