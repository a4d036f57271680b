#!/usr/bin/env python
"""Evaluate a checkpoint: top-1/top-5 of a classifier or k-NN accuracy of a backbone.

    python launch/evaluate.py runs/finetune --filelist /data/imagenet/val.txt
    python launch/evaluate.py runs/pretrain --knn --train-list train.txt --filelist val.txt [--pool cls|mean]
    python launch/evaluate.py random --config launch/recipes/demo_pretrain.yaml --knn   # random-init baseline
"""

import sys

from mapet_ds.engine.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
