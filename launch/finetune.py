#!/usr/bin/env python
"""Fine-tune a ViT classifier (from a MaPeT/PeT/MIM run, an exported backbone, or scratch).

    deepspeed launch/finetune.py --ds_config ds_configs/zero2.json \
        --config launch/recipes/vit_base_in1k_finetune.yaml finetune.init=runs/vit_base_in1k_mapet
"""

import os
import sys

# launch/ holds tokenize.py, which would shadow the standard library's `tokenize`:
# replace the script directory on the import path by the repository root.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from mapet_ds.engine.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
