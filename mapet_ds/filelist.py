"""File lists: the one description of a dataset that every stage shares.

Format (UTF-8 text, one image per line, deterministic order)::

    # optional comment lines
    n01440764/n01440764_10026.JPEG\t0
    n01440764/n01440764_10027.JPEG\t0

Each line is ``<path relative to the root>\t<class index>``. The *sample id* of an
image is its 0-based line number among the non-comment lines; token stores, DALI
readers (which emit the sample id as their "label") and class-label lookups all
index by it. The root is the list file's directory unless given explicitly. An
optional ``classes.txt`` beside the list names class ``i`` on line ``i``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence


# Class indices are int32 in DALI and far below this in any dataset (ImageNet-21k: 21841).
MAX_CLASS_INDEX = 2**31 - 1


class FileListError(ValueError):
    """A file list is missing, empty, malformed, or names files that do not exist."""


def scan_hint(list_path) -> str:
    """How to find and drop the broken files of a list (appended to data errors)."""
    return f"run data/scan.py {list_path} --out <dir> to drop or repair broken files, then use its clean list"


@dataclass
class FileList:
    """An ordered list of images with class labels; index = sample id."""

    list_path: Path
    root: Path
    paths: list[str]
    labels: list[int]
    classes: list[str] | None = None
    _digest: str | None = field(default=None, repr=False)
    lines: list[int] | None = field(default=None, repr=False)  # 1-based line in list_path of each sample

    def where(self, sample_id: int) -> str:
        """``<list>:<line>: <relative path>`` (the sample id when the line is unknown)."""
        line = self.lines[sample_id] if self.lines is not None else None
        at = f"{self.list_path}:{line}" if line is not None else f"{self.list_path} sample {sample_id}"
        return f"{at}: {self.paths[sample_id]}"

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, sample_id: int) -> str:
        return os.path.join(self.root, self.paths[sample_id])

    def abspaths(self) -> list[str]:
        return [os.path.join(self.root, p) for p in self.paths]

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return (max(self.labels) + 1) if self.labels else 0

    def digest(self) -> str:
        """sha256 over (relative path, label) lines: identifies the image set and order."""
        if self._digest is None:
            h = hashlib.sha256()
            for p, y in zip(self.paths, self.labels):
                h.update(f"{p}\t{y}\n".encode())
            self._digest = h.hexdigest()
        return self._digest

    def check_exists(self, limit: int = 5) -> None:
        """Raise FileListError naming the first missing or empty (0-byte) files.

        One ``os.stat`` per image, the call ``isfile`` makes anyway, so refusing empty files
        costs nothing more: DALI would stop mid-run on them with only "File mapping failed".
        """
        missing, empty = [], []
        for i, p in enumerate(self.paths):
            try:
                st = os.stat(os.path.join(self.root, p))
            except OSError:
                missing.append(p)
                continue
            if not stat.S_ISREG(st.st_mode):
                missing.append(p)
            elif st.st_size == 0:
                empty.append(i)
        if not missing and empty:
            more = f" (and {len(empty) - 1} more empty file(s))" if len(empty) > 1 else ""
            raise FileListError(f"{self.where(empty[0])} is an empty file (0 bytes){more}: {scan_hint(self.list_path)}")
        if missing:
            shown = ", ".join(missing[:limit]) + (" ..." if len(missing) > limit else "")
            raise FileListError(
                f"{self.list_path}: {len(missing)} listed file(s) do not exist under {self.root}: "
                f"{shown} (re-run data/make_filelist.py or data/scan.py to refresh the list)"
            )


@contextlib.contextmanager
def _unreadable_as_filelist_error(path: Path, what: str = "file list",
                                  fix: str = "re-write it with data/make_filelist.py"):
    """An unreadable or non-UTF-8 list -> one FileListError naming it (not an errno / codec traceback)."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise FileListError(f"{what} {path} is not UTF-8 text ({e.reason}): {fix}") from None
    except OSError as e:
        raise FileListError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def read_filelist(path: str | os.PathLike, root: str | os.PathLike | None = None) -> FileList:
    """Read a file list; errors name the file and line and say how to fix them."""
    path = Path(path)
    if not path.is_file():
        raise FileListError(f"file list {path} does not exist (make one with data/make_filelist.py)")
    root_dir = Path(root) if root is not None else path.parent
    if not root_dir.is_dir():
        raise FileListError(f"image root {root_dir} for file list {path} is not a directory (set data.root)")
    paths: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first path
    with _unreadable_as_filelist_error(path), open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
            if len(parts) != 2:
                raise FileListError(f"{path}:{lineno}: expected '<relative path>\\t<class index>', got {line!r}")
            rel, lab = parts
            try:
                y = int(lab)
            except ValueError:
                raise FileListError(f"{path}:{lineno}: class index {lab!r} is not an integer") from None
            if y < 0:
                raise FileListError(f"{path}:{lineno}: class index {y} is negative")
            if y > MAX_CLASS_INDEX:
                raise FileListError(f"{path}:{lineno}: class index {y} is absurd (over {MAX_CLASS_INDEX}): class "
                                    f"indices are 0..num_classes-1; fix the line or remake the list")
            paths.append(rel.strip())
            labels.append(y)
            lines.append(lineno)
    if not paths:
        raise FileListError(f"file list {path} is empty (no image lines): check the dataset folder it was made from")
    classes = None
    classes_path = path.parent / "classes.txt"
    if classes_path.is_file():
        with _unreadable_as_filelist_error(classes_path, "class-name file", "save it as UTF-8"):
            text = classes_path.read_text(encoding="utf-8-sig")
        classes = [c.strip() for c in text.splitlines() if c.strip()]
        if labels and max(labels) >= len(classes):
            raise FileListError(
                f"{path}: class index {max(labels)} but {classes_path} names only {len(classes)} classes"
            )
    return FileList(list_path=path, root=root_dir, paths=paths, labels=labels, classes=classes, lines=lines)


def write_filelist(
    path: str | os.PathLike,
    entries: Iterable[tuple[str, int]],
    classes: Sequence[str] | None = None,
) -> Path:
    """Write ``entries`` (relative path, class index) atomically; optionally classes.txt beside it."""
    from mapet_ds.safe_io import atomic_write, atomic_write_text

    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for rel, y in entries:
                if "\t" in rel or "\n" in rel or "\r" in rel:
                    raise FileListError(f"path {rel!r} contains a tab or newline; rename the file")
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:  # os.walk's surrogate escapes of bytes that are not UTF-8
                    raise FileListError(f"file name {os.fsencode(rel)!r} is not valid UTF-8 (lists are UTF-8 text): "
                                        f"rename the file") from None
                f.write(f"{rel}\t{int(y)}\n")

    atomic_write(path, write)
    if classes is not None:
        atomic_write_text(path.parent / "classes.txt", "".join(f"{c}\n" for c in classes))
    return path


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Contiguous shard of ``range(n)`` for ``rank`` the way DALI's reader splits it."""
    start = (n * rank) // world_size
    end = (n * (rank + 1)) // world_size
    return range(start, end)
