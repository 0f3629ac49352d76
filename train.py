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
    from pipeline.repeats import grid_requested, run_grid
    from pipeline.stages import RunInterrupted, run_stage

    try:
        if grid_requested(argv):
            return run_grid(argv)
        cfg = load_config(argv)
        return run_all(argv) if cfg.stage == "all" else run_stage(cfg)
    except RunInterrupted as err:  # not an error: the state is saved and the same command continues
        print(str(err), file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
