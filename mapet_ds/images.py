"""What counts as an image for training: what DALI decodes, not what PIL opens.

* ``DALI_MODES`` / :func:`dali_takes`: the (format, PIL mode) pairs DALI's decoders take,
  checked from an image header in microseconds.
* :class:`DaliProbe`: DALI's own CPU decoder on one file's bytes, for the cases a header
  cannot tell (a PNG with a bad CRC, a TIFF with a damaged directory: PIL decodes them,
  libpng / libtiff inside DALI refuse them).

Light on purpose (numpy, and DALI only when a probe is built): data/scan.py and
data/make_shards.py import it in every worker process, without torch.
"""

from __future__ import annotations

import os
import sys

import numpy as np

# DALI is not fork-safe: a process forked from one that already loaded DALI (a worker pool of
# make_shards run by `tokens.py assign --shards-out`, or inside a test session) can deadlock
# on a lock copied in the held state. Such a child never builds a DaliProbe.
_FORKED_WITH_DALI = False


def _after_fork_in_child() -> None:
    global _FORKED_WITH_DALI
    _FORKED_WITH_DALI = _FORKED_WITH_DALI or "nvidia.dali.backend" in sys.modules


os.register_at_fork(after_in_child=_after_fork_in_child)


def probe_safe() -> bool:
    """May this process build a DaliProbe (DALI installed, and not inherited through a fork)?"""
    if _FORKED_WITH_DALI:
        return False
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True

# The rule is "DALI decodes it", not "PIL opens it": the (format, PIL mode) pairs DALI's decoders
# take (measured with DALI 2.4's CPU decoder, tests/test_data_hostile.py checks every pair that
# PIL writes). Anything else PIL opens (32-bit integer or float TIFF, bilevel or YCbCr TIFF, ...)
# is "unsupported": repaired to an RGB JPEG, or dropped.
DALI_MODES = {
    "JPEG": {"L", "RGB", "CMYK"},
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B"},
    "BMP": {"1", "L", "P", "RGB", "RGBA"},
    "WEBP": {"L", "LA", "RGB", "RGBA"},
    "TIFF": {"L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"},
}


def dali_takes(fmt: str | None, mode: str | None) -> bool:
    """Does DALI decode an image that PIL opens as ``fmt`` (e.g. "TIFF") in ``mode`` (e.g. "I")?"""
    return mode in DALI_MODES.get(fmt or "", ())


def dali_cause(err: BaseException) -> str:
    """The line of a DALI error that says what went wrong (its message is a graph traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    decode = next((ln for ln in lines if "failed to decode" in ln.lower()), None)
    after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"]
    return decode or (after or lines or [""])[0]


class DaliProbe:
    """Decode one encoded image at a time with DALI's CPU decoder: does DALI take this file?

    The pipelines' errors do not say which sample of a batch failed (and PIL opens files DALI
    refuses, e.g. 32-bit TIFFs), so the locator asks DALI itself, file by file. One small
    pipeline is reused while decodes succeed (~4 ms a file) and rebuilt after a failure.
    """

    def __init__(self) -> None:
        self._pipe = None
        self._data = np.zeros(1, np.uint8)

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                      exec_pipelined=False)
        def probe():
            enc = fn.external_source(source=lambda: [self._data], batch=True, dtype=types.UINT8)
            return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

        pipe = probe()
        pipe.build()
        return pipe

    def error(self, data: bytes) -> str | None:
        """None when DALI decodes ``data`` to RGB, else DALI's reason (one line)."""
        if not data:
            return "empty"
        self._data = np.frombuffer(data, dtype=np.uint8)
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.run()
            return None
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses of several kinds
            self._pipe = None
            return dali_cause(e) or type(e).__name__
