#!/usr/bin/env python
"""Evaluate a checkpoint: top-1/top-5 of a classifier or k-NN accuracy of a backbone.

    python launch/evaluate.py runs/finetune --filelist /data/imagenet/val.txt
    python launch/evaluate.py runs/pretrain --knn --train-list train.txt --filelist val.txt
"""

import os
import sys

# launch/ holds tokenize.py, which would shadow the standard library's `tokenize`:
# replace the script directory on the import path by the repository root.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from mapet_ds.engine.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
