"""The command line every job shares: `--config FILE` plus `key.sub=value` overrides.

    def main(argv=None) -> int:
        return job_main(argv, __doc__, FinetuneConfig, run, report, example="adapter.rank=2")

Errors become exit codes with a one-line message on stderr: a `ConfigError` (a bad field,
found before any work starts) exits 2; a job may map its own exceptions to other codes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from flora_platform.config import ConfigError, load_config

CONFIG_ERROR_EXIT = 2


def job_main(
    argv: list[str] | None,
    doc: str,
    config_cls: type,
    run: Callable,
    report: Callable,
    *,
    example: str,
    exit_codes: dict[type[BaseException], tuple[int, str]] | None = None,
) -> int:
    """Parse `argv`, load `config_cls`, `out = run(cfg)`, `report(cfg, out, seconds)`; the exit code.

    exit_codes: exception type -> (exit code, message prefix) for failures the job reports itself.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help=f"key.sub=value overrides, e.g. {example}")
    args = parser.parse_args(argv)
    exit_codes = exit_codes or {}
    started = time.monotonic()
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        out = run(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    except tuple(exit_codes) as err:
        code, prefix = next(v for t, v in exit_codes.items() if isinstance(err, t))
        print(f"{prefix}{err}", file=sys.stderr)
        return code
    report(cfg, out, time.monotonic() - started)
    return 0


def mlflow_ui_hint(tracking_uri: str) -> str:
    return f"  open the UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
