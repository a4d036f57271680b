"""Checkpoints in and out: export to plain timm ViT state dicts, import of the MaPeT release layout."""
