"""The shared `main` of every `python -m fadscale.<stage>` entry point (run under torchrun/accelerate).

Parses `--config F --set key=value ...`, runs the stage, turns a FadscaleError, a full disk (whatever
library reports it) or a file-system error on a named path (read-only, not a folder, no permission) into
one line on stderr with exit code 2, and leaves through `distributed.shutdown` (the gloo teardown fix).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from fadscale.config import load_config
from fadscale.runtime.distributed import set_cpu_threads, shutdown
from fadscale.errors import FadscaleError
from fadscale.runtime.io import disk_full_message, file_error


def run_entry(stage: str, config_cls, run: Callable[[object], int], argv: Sequence[str] | None = None,
              output: Callable[[object], str] = lambda cfg: cfg.run.out_dir) -> None:
    """`output(cfg)`: the folder the stage writes, named when a write fails for want of space."""
    parser = argparse.ArgumentParser(prog=f"python -m fadscale.{stage}")
    parser.add_argument("--config", help="YAML config file (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    args = parser.parse_args(argv)
    where = "."
    try:
        set_cpu_threads()
        cfg = load_config(config_cls, args.config, args.overrides)
        where = output(cfg)
        code = run(cfg)
    except FadscaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except BaseException as exc:  # noqa: BLE001 - print it, then still leave through the clean shutdown
        code = report_failure(exc, where)
    shutdown(code)


def report_failure(exc: BaseException, where) -> int:
    """A full disk or a file-system error on a named path: one line, code 2; anything else: the traceback,
    code 1."""
    line = disk_full_message(exc, where)
    if line is None and isinstance(exc, OSError) and exc.filename is not None:
        line = file_error(exc)
    if line is None:
        traceback.print_exception(exc)
        return 1
    print(f"error: {line}", file=sys.stderr)
    return 2
