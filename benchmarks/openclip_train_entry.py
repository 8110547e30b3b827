"""Runs ``open_clip_train.main`` with vlp's model configs registered, so ``--model vlp-tiny-32`` resolves.

    PYTHONPATH=benchmarks/out/wds0286 python benchmarks/openclip_train_entry.py --model vlp-tiny-32 ...

open_clip_train's webdataset pipeline needs webdataset 0.2.x (1.x drops the ``fname`` key it reads), hence the
separate PYTHONPATH; ``benchmarks/train_compare.py`` installs that copy when it is missing.
"""
import sys

import vlp.models  # noqa: F401 - registers vlp-tiny-32 and friends with open_clip
from open_clip_train.main import main

if __name__ == "__main__":
    main(sys.argv[1:])
