#!/usr/bin/env python
"""Classify images with a trained checkpoint, or export it.

python predict.py ckpt_path=runs/.../best.ckpt inputs=PATH_OR_GLOB output=preds.csv
python predict.py ckpt_path=... export=onnx|torchscript [export_path=model.onnx]
python predict.py ckpt_path=... inputs=photos/ cam_dir=cams/   (Grad-CAM overlays; pip install -e ".[cam]")
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help", "help") for a in argv):  # bare: the usage, not a missing-key error
        print(__doc__)
        return None
    from pipeline.console import exit_on_known
    from pipeline.prediction import main as predict_main

    try:
        return predict_main(argv)
    except Exception as err:
        exit_on_known(err, resume_hint=False)  # e.g. a timm checkpoint without timm installed: one line
        raise  # anything else is a bug: its traceback


if __name__ == "__main__":
    main()
