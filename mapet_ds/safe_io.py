"""Safe writing: outputs stay under the folder the user named, never replace an input, and
appear atomically.

Every tool that writes files (data/*.py, launch/tokens.py, launch/export.py,
launch/compare.py, the training run dirs) goes through these helpers:

- :func:`contained_name` / :func:`contained_names` turn a path taken from a file list
  (``../train/n01/x.JPEG``, ``/data/in/x.JPEG``) into a relative name that cannot leave
  the folder it is joined to; :func:`path_under` joins and checks it.
- :class:`InputGuard` remembers what a command reads (the list, its images, a codebook,
  a checkpoint) and refuses, in one line naming the path, to write onto any of them.
- :func:`atomic_write` writes to a hidden temporary name in the same folder and
  ``os.replace``-s it, so a killed process never leaves a half-written file under the
  final name (and a symlinked output name is replaced, not written through).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np


class UnsafeWriteError(ValueError):
    """An output would land outside its folder or on one of the command's inputs."""


# -- names that stay inside a folder ---------------------------------------------------------

def contained_name(rel: str) -> str:
    """A list path -> a relative POSIX path with no ``..``, no root and no drive.

    The path is normalised first, then the components that would climb out (leading
    ``..``, ``/``, ``C:``) are dropped and the rest is kept::

        ../train/n01/x.JPEG     -> train/n01/x.JPEG
        ../../a/./b/../x.JPEG   -> a/x.JPEG
        /data/in/train/x.JPEG   -> data/in/train/x.JPEG
    """
    p = str(rel).replace("\\", "/")
    p = re.sub(r"^[A-Za-z]:", "", p)  # a Windows drive letter
    # normpath of an absolute path drops leading '..': exactly the components that would escape
    name = posixpath.normpath("/" + p).lstrip("/")
    if not name or name == ".":
        raise UnsafeWriteError(f"path {rel!r} names no file (empty after normalisation)")
    return name


def contained_names(rels: Sequence[str]) -> list[str]:
    """:func:`contained_name` of each path, made unique in list order.

    ``../train/x.JPEG`` and ``train/x.JPEG`` both contain to ``train/x.JPEG``: the first
    keeps it, later ones get ``train/x~1.JPEG``, ``train/x~2.JPEG``... (deterministic for
    a given list).
    """
    names = [contained_name(r) for r in rels]
    taken = {n.lower() for n in names}  # lower(): a case-insensitive file system would also collide
    seen: set[str] = set()
    out = []
    for n in names:
        if n.lower() in seen:
            stem, ext = posixpath.splitext(n)
            k = 1
            while f"{stem}~{k}{ext}".lower() in taken:
                k += 1
            n = f"{stem}~{k}{ext}"
            taken.add(n.lower())
        seen.add(n.lower())
        out.append(n)
    return out


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def path_under(out_dir: str | os.PathLike, rel: str) -> Path:
    """``out_dir / contained_name(rel)``, checked to stay under ``out_dir`` also through symlinks."""
    out_dir = os.path.abspath(out_dir)
    path = os.path.join(out_dir, *contained_name(rel).split("/"))
    if not _inside(os.path.realpath(path), os.path.realpath(out_dir)):
        raise UnsafeWriteError(f"refusing to write {path}: a symlink inside {out_dir} leads out of it "
                               f"(to {os.path.realpath(path)}); remove the link or choose another --out")
    return Path(path)


# -- never write onto an input ----------------------------------------------------------------

def _keys(path: str | os.PathLike, resolve: bool = True) -> set[str]:
    a = os.path.normcase(os.path.abspath(path))
    return {a, os.path.normcase(os.path.realpath(path))} if resolve else {a}


class InputGuard:
    """What one command reads; :meth:`check` refuses an output that is one of them.

    Files are compared by absolute and by resolved path (a symlink to an input is the
    input); folders (a checkpoint tag, a run dir) protect everything inside them. Large
    sets (the images of a list) go through :meth:`add_files` and are compared by absolute
    path only, which costs no system call per image.
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[str, str]] = {}  # key -> (what, path as given)
        self._dirs: dict[str, tuple[str, str]] = {}
        self._many: list[tuple[np.ndarray, str]] = []  # (sorted int64 hashes of keys, what)

    def add(self, path: Optional[str | os.PathLike], what: str) -> "InputGuard":
        if path is None or str(path) == "":
            return self
        table = self._dirs if os.path.isdir(path) else self._files
        for k in _keys(path):
            table.setdefault(k, (what, str(path)))
        return self

    def add_files(self, paths: Iterable[str | os.PathLike], what: str) -> "InputGuard":
        # ImageNet's 1.28M paths as a dict of strings would cost ~300 MB; sorted 64-bit hashes
        # cost 10 MB (a collision, ~2^-64, refuses a write: the safe side).
        keys = np.fromiter((hash(os.path.normcase(os.path.abspath(p))) for p in paths), dtype=np.int64)
        self._many.append((np.sort(keys), what))
        return self

    def find(self, out: str | os.PathLike) -> Optional[tuple[str, str]]:
        """(what, input path) that writing ``out`` would destroy, else None."""
        for k in _keys(out):
            if k in self._files:
                return self._files[k]
            h = hash(k)
            for hashes, what in self._many:
                i = int(np.searchsorted(hashes, h))
                if i < hashes.size and hashes[i] == h:
                    return what, str(out)
            for d, hit in self._dirs.items():
                if _inside(k, d):
                    return hit
        return None

    def check(self, out: str | os.PathLike, flag: str = "--out") -> Path:
        """Return ``Path(out)``, or raise UnsafeWriteError naming the input it would overwrite."""
        hit = self.find(out)
        if hit is not None:
            what, inp = hit
            same = "" if os.path.abspath(inp) == os.path.abspath(out) else f" ({inp})"
            raise UnsafeWriteError(f"refusing to write {out}: it is {what}{same}, an input of this command; "
                                   f"choose another {flag}")
        return Path(out)

    def check_folder(self, out_dir: str | os.PathLike, written: Sequence[str], flag: str = "--out") -> Path:
        """Refuse a folder that is an input, or whose ``written`` entries (files or sub-folders,
        relative to it) hold an input."""
        out_dir = Path(out_dir)
        hit = self.find(out_dir)
        if hit is not None:
            raise UnsafeWriteError(f"refusing to write into {out_dir}: it is {hit[0]} {hit[1]} (or inside it), "
                                   f"an input of this command; choose another {flag}")
        inputs = [*self._files.items(), *self._dirs.items()]
        for name in written:
            for k in _keys(out_dir / name):
                for key, (what, inp) in inputs:
                    if _inside(key, k):
                        raise UnsafeWriteError(f"refusing to write {out_dir / name}: {what} {inp} is there and "
                                               f"would be overwritten; choose another {flag}")
        return out_dir


# -- atomic writes ----------------------------------------------------------------------------

def temp_path(path: str | os.PathLike) -> Path:
    """Hidden temporary name beside ``path`` (same folder, so os.replace is atomic; unique per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then ``os.replace(tmp, path)``; the temporary file never outlives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda t: t.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    def write(t: Path) -> None:
        with open(t, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:  # progress markers: the content must be on disk before the name says "done"
                f.flush()
                os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    return atomic_write(dst, lambda t: shutil.copyfile(src, t))
