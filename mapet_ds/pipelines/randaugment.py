"""timm RandAugment strings ("rand-m9-mstd0.5") on DALI's auto-augment ops, with timm's meaning.

The string is parsed by timm itself (``timm.data.auto_augment.rand_augment_transform``):
its op set (``_RAND_TRANSFORMS``, or ``_RAND_INCREASING_TRANSFORMS`` with ``inc1``), ``n``
ops drawn with replacement, each applied with probability ``p`` (default 0.5), and per op
a magnitude ``m`` (+ N(0, ``mstd``) noise, uniform on [0, m] for mstd > 100) clipped to
[0, ``mmax`` or 10]. Each timm op runs as the DALI op with the same parameter: the
magnitude -> parameter formulas are timm's (``LEVEL_TO_ARG``, called directly where it
has no random sign inside), tabulated on a 0.001-step magnitude grid: the magnitude is
drawn continuously (as timm does) and the parameter of the nearest grid point used, at
most 0.0015 degrees of rotation or 0.02 grey levels of brightness away from timm's.

Geometric ops (rotate, shear, translate) fill with the normalisation mean in 0..255, as
timm's ``create_transform`` does (its ``img_mean`` hparam: (124, 116, 104) for ImageNet).

Known differences from timm's PIL ops (README "Departures from the release"): geometric
ops interpolate bilinearly (DALI's warp ops have only nearest and linear; the recipe's
timm transform uses bicubic); Equalize follows OpenCV's histogram formula; Color changes
saturation in DALI's colour space instead of blending with PIL's greyscale; Sharpness
leaves a 1-px border unsharpened differently.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

STEPS_PER_LEVEL = 1000  # magnitude grid: 0.001 of timm's 0..10 scale (timm draws a float)
TIMM_MAX_MAGNITUDE = 10.0  # timm's _LEVEL_DENOM: M10 = each op's full range
_KEYS = ("mstd", "mmax", "inc", "m", "n", "p")


@dataclass(frozen=True)
class RandAugmentSpec:
    """What a timm RandAugment string means (as timm's own parser reads it)."""

    ops: tuple[str, ...]  # timm op names, e.g. ("AutoContrast", "Equalize", ...)
    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0  # inf: uniform on [0, magnitude]
    magnitude_max: float = TIMM_MAX_MAGNITUDE  # upper clip of the drawn magnitude
    prob: float = 0.5  # each drawn op is applied with this probability
    increasing: bool = False


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parse "rand-m9-n2-mstd0.5-mmax10-inc1-p0.5" with timm's parser; one-line ValueError if bad."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"rand_augment={spec!r}: expected a timm RandAugment string like 'rand-m9-mstd0.5'")
    for part in parts[1:]:
        # timm's split: a key, then a number; 't<set>' picks transform sets we do not map
        key, *rest = re.split(r"(\d.*)", part)
        if key not in _KEYS or not rest:
            raise ValueError(f"rand_augment={spec!r}: unsupported part {part!r} (supported: m, n, p, mstd, mmax, inc, "
                             f"each followed by a number)")
    from timm.data.auto_augment import rand_augment_transform

    try:
        ra = rand_augment_transform(spec, hparams={})
    except (ValueError, AssertionError) as e:
        raise ValueError(f"rand_augment={spec!r}: timm cannot parse it ({e or 'bad part'}); m, n and mmax are "
                         f"integers") from None
    op = ra.ops[0]
    out = RandAugmentSpec(
        ops=tuple(o.name for o in ra.ops), magnitude=float(op.magnitude), num_ops=int(ra.num_layers),
        magnitude_std=float(op.magnitude_std), magnitude_max=float(op.magnitude_max or TIMM_MAX_MAGNITUDE),
        prob=float(op.prob), increasing=any(o.name.endswith("Increasing") for o in ra.ops),
    )
    if out.num_ops < 1 or out.magnitude_std < 0 or not 0 <= out.prob <= 1 or out.magnitude < 0:
        raise ValueError(f"rand_augment={spec!r}: need n >= 1, m >= 0, mstd >= 0 and 0 <= p <= 1")
    return out


def timm_fill(mean) -> tuple[int, int, int]:
    """The fill colour of timm's ``create_transform`` RandAugment (``img_mean``): the
    normalisation mean (0..1) in 0..255, rounded as timm rounds it."""
    return tuple(min(255, round(255 * float(x))) for x in mean)


def _levels(spec: RandAugmentSpec) -> np.ndarray:
    """The magnitude grid [0, 0.001, ..., magnitude_max] (timm levels), float64."""
    return np.arange(int(round(spec.magnitude_max * STEPS_PER_LEVEL)) + 1, dtype=np.float64) / STEPS_PER_LEVEL


def _posterize_mask(bits) -> np.ndarray:
    """PIL's ImageOps.posterize(img, bits) as an AND mask (bits >= 8: identity, 0: black)."""
    bits = int(min(max(bits, 0), 8))
    return np.array(0xFF & ~(2 ** (8 - bits) - 1), dtype=np.uint8)


def _signed(f):
    """Table of ``f`` over +level then -level (index ``bin + L * sign``): timm's ops with a
    random sign inside (``_randomly_negate``) get the sign from a fair coin per sample."""
    return lambda levels: [f(v) for v in levels] + [f(-v) for v in levels], True


def _plain(f):
    return lambda levels: [f(v) for v in levels], False


def timm_op_table() -> dict:
    """timm op name -> (DALI augmentation, parameter table builder or None).

    The builder maps the magnitude grid (timm levels) to the op's parameters with timm's
    formulas: timm's ``LEVEL_TO_ARG`` itself where it has no random sign inside, else
    the same formula on the signed level (sign drawn per sample).
    """
    from nvidia.dali.auto_aug import augmentations as a
    from timm.data.auto_augment import LEVEL_TO_ARG

    def timm_arg(name, dtype=np.float32):
        return lambda v: np.array(LEVEL_TO_ARG[name](float(v), {})[0], dtype=dtype)

    def inc_factor(v):  # timm _enhance_increasing_level_to_arg with the sign already applied
        return max(0.1, 1.0 + float(v) / TIMM_MAX_MAGNITUDE * 0.9)

    frac = 1.0 / TIMM_MAX_MAGNITUDE
    return {
        "AutoContrast": (a.auto_contrast, None),
        "Equalize": (a.equalize, None),
        "Invert": (a.invert, None),
        # timm _rotate/_shear/_translate_rel_level_to_arg: +-30 deg, +-0.3, +-0.45 of the side
        "Rotate": (a.rotate, _signed(lambda v: np.float32(v * frac * 30.0))),
        "ShearX": (a.shear_x, _signed(lambda v: np.array([v * frac * 0.3, 0.0], np.float32))),
        "ShearY": (a.shear_y, _signed(lambda v: np.array([0.0, v * frac * 0.3], np.float32))),
        "TranslateXRel": (a.translate_x, _signed(lambda v: np.array([v * frac * 0.45, 0.0], np.float32))),
        "TranslateYRel": (a.translate_y, _signed(lambda v: np.array([0.0, v * frac * 0.45], np.float32))),
        "Posterize": (a.posterize, _plain(lambda v: _posterize_mask(LEVEL_TO_ARG["Posterize"](float(v), {})[0]))),
        "PosterizeIncreasing": (a.posterize, _plain(
            lambda v: _posterize_mask(LEVEL_TO_ARG["PosterizeIncreasing"](float(v), {})[0]))),
        "Solarize": (a.solarize, _plain(timm_arg("Solarize"))),
        "SolarizeIncreasing": (a.solarize, _plain(timm_arg("SolarizeIncreasing"))),
        "SolarizeAdd": (a.solarize_add, _plain(timm_arg("SolarizeAdd", np.uint8))),
        "Color": (a.color, _plain(timm_arg("Color"))),
        "Contrast": (a.contrast, _plain(timm_arg("Contrast"))),
        "Brightness": (a.brightness, _plain(timm_arg("Brightness"))),
        "Sharpness": (a.sharpness, _plain(lambda v: a.sharpness_kernel_shifted(LEVEL_TO_ARG["Sharpness"](float(v), {})[0]))),
        "ColorIncreasing": (a.color, _signed(lambda v: np.float32(inc_factor(v)))),
        "ContrastIncreasing": (a.contrast, _signed(lambda v: np.float32(inc_factor(v)))),
        "BrightnessIncreasing": (a.brightness, _signed(lambda v: np.float32(inc_factor(v)))),
        "SharpnessIncreasing": (a.sharpness, _signed(lambda v: a.sharpness_kernel_shifted(inc_factor(v)))),
    }


@functools.lru_cache(maxsize=8)  # ~1 s of Python per set at this grid; every loader build reuses it
def _tables(spec: RandAugmentSpec):
    """[(DALI op function, param_device, table np.ndarray | None, signed)] for ``spec.ops``."""
    table = timm_op_table()
    missing = [name for name in spec.ops if name not in table]
    if missing:
        raise ValueError(f"RandAugment ops {missing} have no DALI counterpart here (supported: {sorted(table)})")
    levels = _levels(spec)
    out = []
    for name in spec.ops:
        aug, build = table[name]
        params, signed = (None, False) if build is None else (np.stack(build[0](levels)), build[1])
        out.append((aug.op, aug.param_device, params, signed))
    return out


GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def apply_rand_augment(images, spec: RandAugmentSpec, *, img_size: int, fill=(124, 116, 104)):
    """RandAugment on a uint8 HWC batch of ``img_size`` squares (pipeline needs conditionals).

    images: uint8 [B, img_size, img_size, 3] (DALI DataNode) -> same shape. Per sample and
    layer: an op drawn uniformly from ``spec.ops``, applied with probability ``spec.prob``
    (else identity), at a magnitude drawn as timm draws it. Geometric ops fill with the
    RGB colour ``fill`` (``timm_fill(mean)``).

    DALI's ``Augmentation`` wrappers are bypassed for the raw op functions: their
    per-magnitude parameter mapping runs under the pipeline's AutoGraph and costs ~30 s
    of build time at this grid size; the tables are numpy, built once outside it.
    """
    from nvidia.dali import fn, math as dmath, types
    from nvidia.dali.auto_aug.core import select
    from nvidia.dali.pipeline import do_not_convert

    tables = do_not_convert(_tables)(spec)
    num_levels = len(_levels(spec))
    top = float(num_levels - 1)
    dev = images.device or "cpu"
    fill_rgb = types.Constant(np.asarray(fill, np.float32), device=dev)

    def op_call(k):
        op, _, _, _ = tables[k]
        if op.__name__ not in GEOMETRIC:
            def call(data, **params):
                return op(data, params.get(f"p{k}"))
            return do_not_convert(call)
        extra = {"shape": [img_size, img_size]} if op.__name__.startswith("translate") else {}

        def call(data, **params):
            # DALI's warp ops fill with one value for all channels: warp (image - fill) with 0
            # fill and add it back, which is the per-channel fill exactly (warps are linear)
            shifted = fn.cast(data, dtype=types.FLOAT) - fill_rgb
            out = op(shifted, params.get(f"p{k}"), fill_value=0.0, interp_type=None, **extra) + fill_rgb
            return fn.cast(dmath.clamp(out, 0.0, 255.0), dtype=types.UINT8)

        # No ``if`` inside the ops: AutoGraph need not transpile them (~0.1 s each, per call).
        return do_not_convert(call)

    suite = [op_call(k) for k in range(len(tables))] + [do_not_convert(lambda data, **_: data)]
    identity = len(suite) - 1
    for _ in range(spec.num_ops):
        op_idx = fn.random.uniform(values=list(range(len(tables))), dtype=types.INT32)
        if spec.prob < 1.0:
            applied = fn.random.coin_flip(probability=spec.prob, dtype=types.INT32)
            op_idx = op_idx * applied + identity * (1 - applied)
        m = spec.magnitude * STEPS_PER_LEVEL
        if spec.magnitude_std == float("inf"):
            level = fn.random.uniform(range=[0.0, m])
        elif spec.magnitude_std > 0:
            level = fn.random.normal(mean=m, stddev=spec.magnitude_std * STEPS_PER_LEVEL)
        else:
            level = None
        if level is None:
            mag_bin = types.Constant(int(round(min(max(m, 0.0), top))), dtype=types.INT32)
        else:
            mag_bin = fn.cast(dmath.clamp(dmath.floor(level + 0.5), 0.0, top), dtype=types.INT32)
        sign = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        params = {}
        for k, (_, device, table, signed) in enumerate(tables):
            if table is not None:
                params[f"p{k}"] = types.Constant(table, device=dev if device == "auto" else device)[mag_bin + num_levels * sign if signed else mag_bin]
        images = select(suite, op_idx, images, **params)
    return images
