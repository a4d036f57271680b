#!/usr/bin/env python
"""Linear probing of a frozen backbone (MAE's protocol): BatchNorm + Linear head, LARS.

    python launch/linprobe.py --config launch/recipes/demo_linprobe.yaml linprobe.init=RUN \
        data.train_list=D/train.txt data.val_list=D/val.txt linprobe.max_steps=N linprobe.output_dir=OUT
    deepspeed launch/linprobe.py --ds_config ds_configs/zero2.json \
        --config launch/recipes/vit_base_in1k_linprobe.yaml linprobe.init=runs/vit_base_in1k_mapet
"""

import sys

from mapet_ds.engine.linprobe import main

if __name__ == "__main__":
    sys.exit(main())
