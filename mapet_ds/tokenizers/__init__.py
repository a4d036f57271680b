"""Visual tokenizers: per-patch target ids for MaPeT / PeT / MIM (METHOD.md section 4).

k-means tokenizers = a feature extractor (``features``) + a faiss codebook
(``codebook``); their ids are written offline to a token store (``store``) that
training reads by sample id. ``diagnostics`` measures codebook usage.
"""

from mapet_ds.tokenizers.codebook import (
    Codebook,
    CodebookError,
    KMeansTokenizer,
    fit_codebook,
    sample_features,
    sample_plan,
)
from mapet_ds.tokenizers.diagnostics import code_usage, format_usage, usage_scalars
from mapet_ds.tokenizers.features import (
    PIXEL_NORMS,
    ClipExtractor,
    FeatureError,
    PixelPatchExtractor,
    build_extractor,
    pixel_norm_of,
)
from mapet_ds.tokenizers.store import TokenStore, TokenStoreError, assign_tokens

__all__ = [
    "ClipExtractor",
    "Codebook",
    "CodebookError",
    "FeatureError",
    "KMeansTokenizer",
    "PixelPatchExtractor",
    "PIXEL_NORMS",
    "pixel_norm_of",
    "TokenStore",
    "TokenStoreError",
    "assign_tokens",
    "build_extractor",
    "code_usage",
    "fit_codebook",
    "format_usage",
    "sample_features",
    "sample_plan",
    "usage_scalars",
]
