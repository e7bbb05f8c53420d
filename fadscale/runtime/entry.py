"""The shared `main` of every `python -m fadscale.<stage>` entry point (run under torchrun/accelerate).

Parses `--config F --set key=value ...`, runs the stage, turns a FadscaleError (or a file-system error on
a named path: read-only, not a folder, no permission, disk full) into one line on stderr with exit code 2, and leaves through `distributed.shutdown` (the gloo teardown fix).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from fadscale.config import load_config
from fadscale.runtime.distributed import set_cpu_threads, shutdown
from fadscale.runtime.io import FadscaleError, file_error


def run_entry(stage: str, config_cls, run: Callable[[object], int], argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m fadscale.{stage}")
    parser.add_argument("--config", help="YAML config file (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    args = parser.parse_args(argv)
    try:
        set_cpu_threads()
        code = run(load_config(config_cls, args.config, args.overrides))
    except FadscaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: keep the traceback
            traceback.print_exc()
            code = 1
        else:
            print(f"error: {file_error(exc)}", file=sys.stderr)
            code = 2
    except BaseException:  # noqa: BLE001 - print it, then still leave through the clean shutdown
        traceback.print_exc()
        code = 1
    shutdown(code)
