"""timm-style RandAugment strings ("rand-m9-mstd0.5") on DALI's auto-augment ops.

timm's magnitude scale runs 0..10 (M9 = 90% of each op's maximum); DALI's ops map a
magnitude *bin* linearly onto the same kind of range. Using 101 bins (0.1 steps of the
timm scale) makes bin ``10 * M`` the timm magnitude, and lets ``mstd`` draw a per-sample,
per-op magnitude from N(M, mstd) clipped to [0, mmax] as timm does (quantised to 0.1).
The op suite is DALI's RandAugment suite (translate/shear/rotate/brightness/contrast/
colour/sharpness/posterize/solarize/equalize/auto-contrast/identity), the monotonic
("increasing", timm's inc1) variant unless ``inc0`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass

BINS_PER_UNIT = 10  # magnitude bins per unit of timm's 0..10 scale
TIMM_MAX_MAGNITUDE = 10.0


@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = TIMM_MAX_MAGNITUDE
    increasing: bool = True


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parse "rand-m9-n2-mstd0.5-mmax10-inc1" (timm's grammar; unknown parts are an error)."""
    parts = spec.split("-")
    if not parts or parts[0] != "rand":
        raise ValueError(f"rand_augment={spec!r}: expected a timm RandAugment string like 'rand-m9-mstd0.5'")
    kw: dict = {}
    for part in parts[1:]:
        key = next((k for k in ("mstd", "mmax", "inc", "m", "n") if part.startswith(k)), None)
        if key is None:
            raise ValueError(f"rand_augment={spec!r}: unsupported part {part!r} (supported: m, n, mstd, mmax, inc)")
        try:
            value = float(part[len(key):])
        except ValueError:
            raise ValueError(f"rand_augment={spec!r}: {part!r} needs a number after {key!r}") from None
        if key == "m":
            kw["magnitude"] = value
        elif key == "n":
            kw["num_ops"] = int(value)
        elif key == "mstd":
            kw["magnitude_std"] = value
        elif key == "mmax":
            kw["magnitude_max"] = value
        else:
            kw["increasing"] = bool(int(value))
    ra = RandAugmentSpec(**kw)
    if not 0 <= ra.magnitude <= ra.magnitude_max <= TIMM_MAX_MAGNITUDE:
        raise ValueError(f"rand_augment={spec!r}: need 0 <= m <= mmax <= {TIMM_MAX_MAGNITUDE:g}")
    if ra.num_ops < 1 or ra.magnitude_std < 0:
        raise ValueError(f"rand_augment={spec!r}: need n >= 1 and mstd >= 0")
    return ra


def apply_rand_augment(images, spec: RandAugmentSpec, *, img_size: int):
    """RandAugment on a uint8 HWC batch of ``img_size`` squares (pipeline needs conditionals).

    images: uint8 [B, img_size, img_size, 3] (DALI DataNode) -> same shape.
    """
    from nvidia.dali import fn, math as dmath, types
    from nvidia.dali.auto_aug.core import select, signed_bin
    from nvidia.dali.auto_aug.rand_augment import get_rand_augment_non_monotonic_suite, get_rand_augment_suite

    suite_fn = get_rand_augment_suite if spec.increasing else get_rand_augment_non_monotonic_suite
    # timm translates by up to 45% of the image side at full magnitude.
    suite = suite_fn(use_shape=True, max_translate_rel=0.45)
    num_bins = int(TIMM_MAX_MAGNITUDE * BINS_PER_UNIT) + 1
    top_bin = spec.magnitude_max * BINS_PER_UNIT
    for _ in range(spec.num_ops):
        op_idx = fn.random.uniform(values=list(range(len(suite))), dtype=types.INT32)
        if spec.magnitude_std > 0:
            m = fn.random.normal(mean=spec.magnitude * BINS_PER_UNIT, stddev=spec.magnitude_std * BINS_PER_UNIT)
            m = dmath.clamp(dmath.floor(m + 0.5), 0.0, top_bin)
            mag_bin = fn.cast(m, dtype=types.INT32)
        else:
            mag_bin = int(round(spec.magnitude * BINS_PER_UNIT))
        images = select(
            suite,
            op_idx,
            data=images,
            magnitude_bin=signed_bin(mag_bin),
            num_magnitude_bins=num_bins,
            shape=[img_size, img_size],
            fill_value=128,  # timm's fill colour for geometric ops
        )
    return images
