import os

import pytest

# Tests run on CPU with DeepSpeed's CPU accelerator and few threads (2-core CI).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def tiny_model_cfg():
    from mapet_ds.config import ModelConfig

    return ModelConfig(size=None, embed_dim=48, depth=2, num_heads=3, img_size=64, patch_size=16, drop_path=0.0)
