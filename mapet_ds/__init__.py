"""mapet_ds: MaPeT (Masked and Permuted ViT pre-training) on DeepSpeed and DALI."""

__version__ = "0.1.0"
