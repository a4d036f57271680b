"""Safe writing: outputs stay under the folder the user named, never replace an input, and
appear atomically.

Every tool that writes files (data/*.py, launch/tokens.py, launch/export.py,
launch/compare.py, the training run dirs) goes through these helpers:

- :func:`contained_name` / :func:`contained_names` turn a path taken from a file list
  (``../train/n01/x.JPEG``, ``/data/in/x.JPEG``) into a relative name that cannot leave
  the folder it is joined to; :func:`path_under` joins and checks it.
- :class:`InputGuard` remembers what a command reads (the list, its images, a codebook,
  a checkpoint) and refuses, in one line naming the path, to write onto any of them.
- :func:`atomic_write` writes to a hidden temporary file created exclusively (random name,
  ``O_EXCL``: never a pre-placed link) in the same folder and ``os.replace``-s it, so a
  killed process never leaves a half-written file under the final name (and a symlinked
  output name is replaced, not written through); :func:`remove_own_temps` deletes only
  such temporaries of a tool's own outputs, listing the folder (no glob over user paths).
- :func:`out_folder` / :func:`sub_folder` check the folders written into: not a file, not
  a dangling link, not an input, and (sub-folders) real path inside the output folder.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
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
            self.check(out_dir / name, flag)  # also the images of a list (add_files)
        return out_dir


# -- atomic writes ----------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)
# mkstemp's name: prefix + 8 characters of [a-z0-9_] + suffix
_TEMP_RE = r"\.{name}\.[a-z0-9_]{{8}}\.tmp"


def temp_file(path: str | os.PathLike) -> Path:
    """Create (exclusively: ``O_CREAT | O_EXCL``, which never follows a link) an empty hidden
    temporary file ``.NAME.XXXXXXXX.tmp`` beside ``path`` and return its name.

    A random name that did not exist a moment ago cannot be a pre-placed symlink, so what is
    written to it lands in this folder, in a file this process made. Same folder as ``path``:
    ``os.replace`` onto it is atomic.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
    finally:
        os.close(fd)
    return Path(name)


def is_temp_of(entry: str, name_pattern: str) -> bool:
    """True when ``entry`` (a file name) is a :func:`temp_file` of an output whose name fully
    matches the regular expression ``name_pattern``: how a rerun recognises its own leftovers."""
    return re.fullmatch(_TEMP_RE.format(name=f"(?:{name_pattern})"), entry) is not None


def remove_own_temps(folder: str | os.PathLike, name_pattern: str) -> list[str]:
    """Delete the leftovers of killed runs in ``folder``: :func:`temp_file` names of outputs
    matching ``name_pattern`` only (never another file, never a folder; a link is unlinked,
    not followed). Lists the folder instead of globbing it, so glob characters in a user's
    path cannot widen the match. -> the names removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if is_temp_of(e.name, name_pattern) and not e.is_dir(follow_symlinks=False):
            try:
                os.unlink(e.path)
                removed.append(e.name)
            except FileNotFoundError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then ``os.replace(tmp, path)``; the temporary file never outlives a failure.

    ``tmp`` is made by :func:`temp_file` (exclusive, random name, same folder); a symlink at
    ``path`` itself is replaced, never written through.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
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


# -- output folders ---------------------------------------------------------------------------

def out_folder(out: str | os.PathLike, guard: Optional[InputGuard] = None, flag: str = "--out",
               create: bool = True) -> Path:
    """Check (and create) an output folder: one UnsafeWriteError line, never a traceback, when
    ``out`` is an existing file, a dangling symlink, a folder that is one of the ``guard``'s
    inputs (or inside one), or cannot be created."""
    out = Path(out)
    if os.path.lexists(out) and not os.path.exists(out):
        raise UnsafeWriteError(f"{flag} {out} is a dangling symlink (to {os.readlink(out)}): remove it or choose "
                               f"another {flag}")
    if guard is not None:
        hit = guard.find(out)
        if hit is not None:
            raise UnsafeWriteError(f"refusing to write into {out}: it is {hit[0]} {hit[1]} (or inside it), an input "
                                   f"of this command; choose another {flag}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UnsafeWriteError(f"{flag} {out} is a file, not a folder: choose a folder")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UnsafeWriteError(f"{flag} {out} cannot be created ({e.strerror or e}): choose another {flag}") from None
    return out


def sub_folder(out: str | os.PathLike, rel: str, flag: str = "--out") -> Path:
    """``out/rel`` created as a folder whose real path stays inside ``out``'s: a symlink at
    ``out/rel`` (or a part of it) that leads elsewhere is refused, not followed."""
    path = path_under(out, rel)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UnsafeWriteError(f"{path} is in the way of a folder this command writes: it is a file or a dangling "
                               f"link; remove it or choose another {flag}")
    path.mkdir(parents=True, exist_ok=True)
    path_under(out, rel)  # again: a link placed while creating it
    return path


def print_error(message: object) -> None:
    """``error: <message>`` on stderr, on a line of its own: progress bars still open (a
    failure in the middle of a tqdm loop) are closed first, so the line does not start
    after a bar's carriage return."""
    import sys

    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except ImportError:
        pass
    print(f"error: {message}", file=sys.stderr, flush=True)
