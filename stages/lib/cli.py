"""How every stage ends: exit 0, or one line on stderr and a non-zero status, never a bare traceback.

- A known bad input (`InputError`: a parameter, a file, a line) prints `<stage>: error: <message>` and exits 2.
- A run that fails on its own (`RunError`: a loss gone NaN) prints the same way and exits 1.
- Anything else is a bug or an environment fault: one line naming the stage and what it was working on, exit 1;
  the traceback only with `--debug` or `LORA_E2E_DEBUG=1`.
- SIGTERM or SIGHUP (from a user, DVC, or the stage's lifeline when the DVC that started it died): the cleanup in
  `finally` blocks runs (atomic outputs removed), then `<stage>: stopped: <why>` and exit 128 + signal.

Run as a program (`sys.exit(cli.run("train", main))` in a stage's `__main__`, argv read from sys.argv), a stage
also gets stages/lib/lifeline.py: `exit_on_signals()` and `watch()`, so that it never outlives the process that
started it. Called with an explicit argv (tests, in-process) it gets neither: no signal handlers, no watcher.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable


class InputError(ValueError):
    """Bad input the user can fix; the message names the parameter, file or line."""


class RunError(RuntimeError):
    """The run itself failed (diverged, produced a non-finite number); the message says where."""


def run(stage: str, main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Call `main(argv)` and turn its outcome into an exit status (see the module docstring)."""
    from stages.lib import lifeline  # it raises InputError: imported here, not at the top

    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LORA_E2E_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        if as_program:
            lifeline.exit_on_signals()
            lifeline.watch()
        return int(main(argv) or 0)
    except lifeline.Stopped as e:
        print(f"{stage}: stopped: {e.reason}", file=sys.stderr)
        return int(e.code)
    except InputError as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"{stage}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns unexpected errors into a line
        if lifeline.stopped():  # a library's own SIGTERM handling (torch's elastic launcher) raised its own type
            print(f"{stage}: stopped: {lifeline.stopped()}", file=sys.stderr)
            return 128 + signal.SIGTERM
        if debug:
            traceback.print_exc()
        where = " ".join(argv)
        print(f"{stage}: internal error ({type(e).__name__}: {e}) while running `{stage} {where}`"
              f"{'' if debug else '; rerun with LORA_E2E_DEBUG=1 for the traceback'}", file=sys.stderr)
        return 1
