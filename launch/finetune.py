#!/usr/bin/env python
"""Fine-tune a ViT classifier (from a MaPeT/PeT/MIM run, an exported backbone, or scratch).

    deepspeed launch/finetune.py --ds_config ds_configs/zero2.json \
        --config launch/recipes/vit_base_in1k_finetune.yaml finetune.init=runs/vit_base_in1k_mapet
"""

import sys

from mapet_ds.engine.finetune import main

if __name__ == "__main__":
    sys.exit(main())
