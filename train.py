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
    from datamodules.image_folder import DataLayoutError
    from lightning_modules.backbones import WeightsError

    try:
        cfg = load_config(argv)
        from pipeline.stages import run_stage

        return run_stage(cfg)
    except (ConfigError, DataLayoutError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
