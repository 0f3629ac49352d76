#!/usr/bin/env python
"""Entry point: ``python train.py stage=finetune data.root=... key=value ...`` (see --help)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    from pipeline.config import help_text, load_config

    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text())
        return None
    from lightning_modules.errors import UserError
    from pipeline.all_stages import run_all
    from pipeline.console import quiet_console, result_block
    from pipeline.repeats import grid_requested, run_grid
    from pipeline.run_dir import is_rank_zero
    from pipeline.stages import RunInterrupted, run_stage

    quiet_console()
    try:
        if grid_requested(argv):
            return run_grid(argv)  # ends with its summary table
        cfg = load_config(argv)
        if cfg.stage == "all":
            return run_all(argv)  # ends with its comparison table
        metrics = run_stage(cfg)
        if is_rank_zero() and cfg.stage != "lr_find":
            print(result_block(metrics))
        return metrics
    except RunInterrupted as err:  # not an error: the state is saved and the same command continues
        print(str(err), file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
