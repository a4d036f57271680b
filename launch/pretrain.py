#!/usr/bin/env python
"""Pre-train a ViT with MaPeT (or the PeT / MIM baselines) on DeepSpeed.

    deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json \
        --config launch/recipes/vit_base_in1k_mapet.yaml [section.key=value ...]
"""

import sys

from mapet_ds.engine.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
