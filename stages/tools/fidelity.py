"""fidelity: how far outputs follow their MRs (stages/lib/fidelity.py's approximate slot matcher), for any file.

    python -m stages.tools.fidelity --refs data/raw/test.txt --predictions data/predictions/lora-s110.txt [...]

--refs: the test set whose MRs the outputs follow, an E2E CSV or the authors' text file (MRs grouped in order of
first appearance, as the scorers group them). Prints one JSON object per predictions file. Not a DVC stage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.lib import cli
from stages.lib.authors_data import group_references, read_authors_file
from stages.lib.e2e import DataError, group_by_mr, read_e2e_csv, read_text
from stages.lib.fidelity import fidelity


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refs", required=True, help="the test set: an E2E CSV or the authors' text file")
    ap.add_argument("--predictions", required=True, nargs="+", help="one output per line, one line per MR")
    args = ap.parse_args(argv)
    groups = (group_by_mr(read_e2e_csv(args.refs)) if Path(args.refs).suffix.lower() == ".csv"
              else group_references(read_authors_file(args.refs)))
    mrs = [mr for mr, _ in groups]
    result = {}
    for path in args.predictions:
        outputs = read_text(path).splitlines()
        try:
            result[path] = fidelity(mrs, outputs)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("fidelity", main))
