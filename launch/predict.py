#!/usr/bin/env python
"""Top-k class names and probabilities for images and folders (the eval view through DALI).

    python launch/predict.py runs/vit_base_in1k_finetune photos/ cat.jpg --topk 5 [--json]
    python launch/predict.py exports/mapet_b_timm photos/      # a launch/export.py --timm-dir folder
"""

import sys

from mapet_ds.engine.predict import main

if __name__ == "__main__":
    sys.exit(main())
