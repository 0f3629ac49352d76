#!/usr/bin/env python
"""Entry point: ``python train.py stage=finetune data.root=... key=value ...`` (see --help)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    # Imported here, not at the top: --help needs only the schema (pipeline/config/usage.py), not torch and Lightning.
    from pipeline.config.usage import help_text, show_config

    flags = [a for a in argv if a in ("-h", "--help", "help", "--show-config")]
    if flags:  # --help alone: the keys; with keys (or --show-config): the values this run would use
        keys = [a for a in argv if a not in flags]
        if keys or "--show-config" in flags:
            from core.errors import ConfigError

            try:
                print(show_config(keys))
            except ConfigError as err:
                raise SystemExit(f"error: {err}") from None
        else:
            print(help_text())
        return None
    from pipeline.api import run_argv
    from pipeline.console import exit_on_known, quiet_console, result_block
    from pipeline.runner.run_dir import is_rank_zero

    quiet_console()
    try:
        metrics = run_argv(argv)  # a sweep or stage=all ends with its own table
        if is_rank_zero() and metrics.get("stage") not in (None, "all", "lr_find"):  # a sweep has none
            print(result_block(metrics, argv))
        return metrics
    except Exception as err:
        exit_on_known(err)  # the user's and the machine's errors: one line and an exit code
        raise  # anything else is a bug: its traceback


if __name__ == "__main__":
    main()
