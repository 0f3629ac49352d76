#!/usr/bin/env python
"""Entry point: ``python train.py stage=finetune data.root=... key=value ...`` (see --help)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    from pipeline.config import ConfigError, help_text, load_config

    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text())
        return None
    from datamodules.download import DownloadError
    from datamodules.image_folder import DataLayoutError
    from lightning_modules.backbones import BackboneError, WeightsError
    from lightning_modules.run_safety import NonFiniteLossError
    from lightning_modules.schedule import PlanError
    from pipeline.all_stages import run_all
    from pipeline.repeats import grid_requested, run_grid
    from pipeline.stages import RunInterrupted, run_stage

    try:
        if grid_requested(argv):
            return run_grid(argv)
        cfg = load_config(argv)
        return run_all(argv) if cfg.stage == "all" else run_stage(cfg)
    except (ConfigError, DataLayoutError, WeightsError, BackboneError, DownloadError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except RunInterrupted as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
