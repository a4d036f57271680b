"""Models: timm ViT backbone, two-stream MaPeT/PeT, BEiT-style MIM, classifier."""
