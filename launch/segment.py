#!/usr/bin/env python
"""Semantic segmentation: UperNet on the ViT (from a MaPeT/PeT/MIM run, a fine-tuned run, an
exported/timm or release checkpoint, or scratch), BEiT's ADE20K protocol.

    deepspeed launch/segment.py --ds_config ds_configs/zero2.json \
        --config launch/recipes/vit_base_ade20k_upernet.yaml segment.init=runs/vit_base_in1k_mapet
"""

import sys

from mapet_ds.engine.segment import main

if __name__ == "__main__":
    sys.exit(main())
