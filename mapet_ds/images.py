"""What counts as an image for training: what DALI decodes, not what PIL opens.

* ``DALI_MODES`` / :func:`dali_takes`: the (format, PIL mode) pairs DALI's decoders take,
  checked from an image header in microseconds.
* :class:`DaliProbe`: DALI's own CPU decoder on one file's bytes, for the cases a header
  cannot tell (a PNG with a bad CRC, a TIFF with a damaged directory: PIL decodes them,
  libpng / libtiff inside DALI refuse them).

* :func:`check_image` / :func:`check_bytes`: data/scan.py's check of one image (and
  make_shards'), issues in ``DROP`` / ``CONVERT`` / ``WARN``.

Light on purpose (numpy, PIL, and DALI only when a probe is built): data/scan.py and
data/make_shards.py import it in every worker process, without torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

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


# -- the scan's check of one image ----------------------------------------------------------------

DROP = ("truncated", "undecodable", "not_a_file", "too_large")
CONVERT = ("cmyk", "wrong_format", "unsupported")
WARN = ("grayscale", "tiny")
ISSUES = DROP + CONVERT + WARN

# Defaults of the caps (--max-pixels, --max-bytes). A 100-megapixel image decodes to 300 MB of
# RGB; camera photos (ImageNet-21k's largest) stay well below, decompression bombs do not.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 256 * 2**20

_EXPECTED = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
             ".tif": "TIFF", ".tiff": "TIFF"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
# Formats PIL may identify: what DALI reads plus the few a mislabelled file tends to be. Never
# PIL's full plugin list: EPS would run Ghostscript on a hostile file.
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")
_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


class NotAnImage(Exception):
    """A listed path that cannot be read as an image file: ``issue`` (one of DROP) and a detail."""

    def __init__(self, issue: str, detail: str):
        super().__init__(detail)
        self.issue, self.detail = issue, detail


def read_image_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, else NotAnImage.

    Only regular files are images: a FIFO would block a reader forever and ``/dev/zero``
    never ends, so the type is checked (``stat``, following links) before the file is
    opened, and again on the open descriptor (``O_NONBLOCK``: a FIFO swapped in meanwhile
    does not block); the read stops one byte past the cap.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise NotAnImage("undecodable", f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotAnImage("not_a_file", f"not a regular file ({_KIND.get(stat.S_IFMT(st.st_mode), 'special file')})")
    if st.st_size > max_bytes:
        raise NotAnImage("too_large", f"{st.st_size} bytes, over the cap of {max_bytes} (--max-bytes)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise NotAnImage("undecodable", f"cannot read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotAnImage("not_a_file", "not a regular file (replaced while being checked)")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise NotAnImage("undecodable", f"cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise NotAnImage("too_large", f"over the cap of {max_bytes} bytes (--max-bytes)")
    return data


@contextlib.contextmanager
def _pixel_cap(max_pixels: int):
    """PIL's own bomb check at our cap (PIL raises at twice it, we refuse above it ourselves)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(1, int(max_pixels))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


_PROBE = None  # this process's DaliProbe


def _dali_error(data: bytes) -> str | None:
    """DALI's CPU decoder on ``data``: None when it decodes (or no probe can run here), else why not."""
    global _PROBE
    if not probe_safe():
        # a worker forked from a process that already ran DALI (e.g. `tokens.py assign
        # --shards-out`, whose loader just decoded these images) checks by the rules only
        return None
    if _PROBE is None:
        _PROBE = DaliProbe()
    return _PROBE.error(data)


def check_bytes(data: bytes, name: str, min_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                dali: bool = True) -> dict:
    """Inspect one image's bytes (``name`` only for its extension).
    -> {"issues": [...], "format", "mode", "size", "detail"}; never raises on bad data.

    After PIL's decode and the format/mode rule, an image that would be kept is decoded once
    more by DALI's own CPU decoder (``dali``, when DALI is installed; ~4 ms for an ImageNet
    JPEG): the rule is "DALI decodes it", and some damage only DALI's decoders notice."""
    info: dict = {"issues": [], "format": None, "mode": None, "size": None, "detail": ""}
    if not data:
        info["issues"].append("undecodable")
        info["detail"] = "empty file"
        return info
    try:
        with _pixel_cap(max_pixels), Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
            info.update(format=img.format, mode=img.mode, size=list(img.size))
            w, h = img.size
            if w * h > max_pixels:  # refused from the header, before anything is decoded
                info["issues"].append("too_large")
                info["detail"] = f"{w}x{h} = {w * h} pixels, over the cap of {max_pixels} (--max-pixels)"
                return info
            img.load()  # full decode: PIL raises on truncated data (LOAD_TRUNCATED_IMAGES is off)
    except UnidentifiedImageError:  # its message names our in-memory buffer, not the file
        info["issues"].append("undecodable")
        info["detail"] = "not an image (unknown format)"
        return info
    except Image.DecompressionBombError as e:
        info["issues"].append("too_large")
        info["detail"] = f"{e} (--max-pixels)"
        return info
    except OSError as e:
        info["issues"].append("truncated" if "truncated" in str(e).lower() or info["format"] else "undecodable")
        info["detail"] = str(e)
        return info
    except Exception as e:  # noqa: BLE001 - hostile bytes make PIL raise anything (struct.error, ...)
        info["issues"].append("undecodable")
        info["detail"] = f"{type(e).__name__}: {e}"
        return info
    expected = _EXPECTED.get(os.path.splitext(name)[1].lower())
    if expected and info["format"] != expected:
        info["issues"].append("wrong_format")
        info["detail"] = f"{info['format']} data behind a {os.path.splitext(name)[1]} name"
    elif not dali_takes(info["format"], info["mode"]) and info["mode"] != "CMYK":
        info["issues"].append("unsupported")
        info["detail"] = f"{info['format']} in PIL mode {info['mode']}, which DALI's decoders do not take"
    if info["mode"] == "CMYK":
        info["issues"].append("cmyk")
    if dali and not info["issues"] and (err := _dali_error(data)) is not None:
        # PIL decoded it, DALI does not (a PNG with a bad CRC, a damaged TIFF directory...)
        info["issues"].append("unsupported")
        info["detail"] = f"PIL decodes it, DALI does not ({err})"
    if info["mode"] in _GRAY_MODES:
        info["issues"].append("grayscale")
    if min(info["size"]) < min_size:
        info["issues"].append("tiny")
    return info


def check_image(path: str, min_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Inspect one file (a regular file, read with a size cap). -> check_bytes' dict."""
    try:
        data = read_image_bytes(path, max_bytes)
    except NotAnImage as e:
        return {"issues": [e.issue], "format": None, "mode": None, "size": None, "detail": e.detail}
    return check_bytes(data, path, min_size, max_pixels)
