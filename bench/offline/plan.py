"""Pure logic of the offline staging (no network, standard library only, Python >= 3.8).

Used by ``stage.py`` on the machine with the package index and by ``node_install.py`` on
the air-gapped node (it travels in the first batch), so both sides agree on names, tags,
batches and checksums.

A *batch* is what one transfer carries (at most ``batch_bytes``). A wheel larger than a
batch is cut into parts of at most ``batch_bytes`` each; ``manifest.json`` (first batch)
records every file's sha256 and, for a split wheel, each part's sha256 and the whole
wheel's, which the node checks after joining.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

MIB = 2**20
MANIFEST = "manifest.json"
PART_SUFFIX = ".part{:03d}of{:03d}"


def canonical(name: str) -> str:
    """PEP 503 normalised project name: ``Open_CLIP.torch`` -> ``open-clip-torch``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_freeze(text: str) -> Dict[str, str]:
    """``pip list --format freeze`` (or ``pip freeze``) -> {canonical name: version}.

    The local label goes (``torch==2.11.0+cu130`` -> ``2.11.0``): it names the node's build,
    and a constraint without one matches any build of that release. Editable/URL lines and
    comments carry no version the resolver could use and are skipped."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m:
            out[canonical(m.group(1))] = m.group(2).split("+", 1)[0]
    return out


def requirement_name(req: str) -> str:
    """``open_clip_torch>=2.24`` -> ``open-clip-torch``."""
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot read a project name from requirement {req!r}")
    return canonical(m.group(1))


def missing(requirements: Iterable[str], node: Dict[str, str]) -> List[str]:
    """The requirements whose project the node does not have (by name: the node's version is
    what it runs; a version clash shows as a resolver error in stage.py, not a silent swap)."""
    return [r for r in requirements if requirement_name(r) not in node]


# ---------------------------------------------------------------------------------------
# wheel tags (PEP 425 / PEP 600)

_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def wheel_tags(filename: str) -> Tuple[str, str, List[str], List[str], List[str]]:
    """``name-ver[-build]-py-abi-plat.whl`` -> (name, version, pythons, abis, platforms)."""
    if not filename.endswith(".whl"):
        raise ValueError(f"{filename}: not a wheel")
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name (name-version[-build]-python-abi-platform.whl)")
    return parts[0], parts[1], parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")


def _platform_fits(plat: str, target: str) -> bool:
    if plat == "any":
        return True
    m = re.match(r"^manylinux_(\d+)_(\d+)_(.+)$", target)
    if not m:
        return plat == target
    glibc, arch = (int(m.group(1)), int(m.group(2))), m.group(3)
    m2 = re.match(r"^manylinux_(\d+)_(\d+)_(.+)$", plat)
    if m2:
        return m2.group(3) == arch and (int(m2.group(1)), int(m2.group(2))) <= glibc
    for legacy, ver in _LEGACY_MANYLINUX.items():
        if plat == f"{legacy}_{arch}":
            return ver <= glibc
    return False


def wheel_fits(filename: str, python: str, platform: str) -> bool:
    """Does the wheel install on CPython ``python`` ("3.12") on ``platform``
    ("manylinux_2_28_x86_64": glibc 2.28 or newer, x86_64)?"""
    _, _, pys, abis, plats = wheel_tags(filename)
    major, minor = (int(x) for x in python.split(".")[:2])
    cp = f"cp{major}{minor}"

    def py_ok(py: str, abi: str) -> bool:
        if abi == "abi3":  # stable ABI: built for cp3X, runs on every CPython >= 3.X
            m = re.match(r"^cp(\d)(\d+)$", py)
            return bool(m) and int(m.group(1)) == major and int(m.group(2)) <= minor
        if abi == cp or abi == cp + "m":
            return py == cp
        if abi == "none":
            if py in (cp, f"py{major}", f"py{major}{minor}"):
                return True
            m = re.match(r"^py(\d)(\d+)$", py)
            return bool(m) and int(m.group(1)) == major and int(m.group(2)) <= minor
        return False

    return (any(py_ok(p, a) for p in pys for a in abis)
            and any(_platform_fits(p, platform) for p in plats))


# ---------------------------------------------------------------------------------------
# batches

def plan_batches(files: Sequence[Tuple[str, int]], batch_bytes: int) -> List[List[Tuple[str, int, int]]]:
    """Group files into transfers of at most ``batch_bytes``.

    files: (name, size). Returns batches of (name, part index, part size); part index is
    0 for a whole file and 1..n for the n parts of a file larger than ``batch_bytes``
    (every part is at most ``batch_bytes``). First-fit decreasing: few batches, and the
    order is deterministic (size, then name)."""
    if batch_bytes <= 0:
        raise ValueError("batch size must be positive")
    pieces: List[Tuple[str, int, int]] = []
    for name, size in files:
        if size <= batch_bytes:
            pieces.append((name, 0, size))
        else:
            n = -(-size // batch_bytes)
            for i in range(n):
                pieces.append((name, i + 1, min(batch_bytes, size - i * batch_bytes)))
    pieces.sort(key=lambda p: (-p[2], p[0], p[1]))
    batches: List[List[Tuple[str, int, int]]] = []
    room: List[int] = []
    for piece in pieces:
        for i, free in enumerate(room):
            if piece[2] <= free:
                batches[i].append(piece)
                room[i] -= piece[2]
                break
        else:
            batches.append([piece])
            room.append(batch_bytes - piece[2])
    return batches


def part_name(name: str, index: int, count: int) -> str:
    return name + PART_SUFFIX.format(index, count)


def sha256(path: Path, chunk: int = 8 * MIB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_part(src: Path, dst: Path, index: int, part_bytes: int) -> str:
    """Copy part ``index`` (1-based) of ``src`` (``part_bytes`` per part) to ``dst``; its sha256."""
    h = hashlib.sha256()
    with open(src, "rb") as f, open(dst, "xb") as out:
        f.seek((index - 1) * part_bytes)
        left = part_bytes
        while left > 0:
            block = f.read(min(8 * MIB, left))
            if not block:
                break
            out.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


class StageError(Exception):
    """A missing, corrupt or mislabelled staged file: the message names it and the fix."""


def join_parts(parts: Sequence[Path], part_sha: Sequence[str], whole_sha: str, dst: Path) -> None:
    """Concatenate ``parts`` into ``dst`` checking each part's and the whole file's sha256;
    written under a temporary name and renamed, so a failed join leaves no wheel behind."""
    tmp = dst.with_name(dst.name + ".joining")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part, want in zip(parts, part_sha):
                ph = hashlib.sha256()
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(8 * MIB), b""):
                        ph.update(block)
                        h.update(block)
                        out.write(block)
                if ph.hexdigest() != want:
                    raise StageError(f"{part.name}: sha256 {ph.hexdigest()[:16]}... != manifest {want[:16]}...: "
                                     f"transfer it again")
        if h.hexdigest() != whole_sha:
            raise StageError(f"{dst.name}: joined sha256 {h.hexdigest()[:16]}... != manifest {whole_sha[:16]}...: "
                             f"transfer its parts again")
        tmp.replace(dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_manifest(path: Path) -> dict:
    m = json.loads(Path(path).read_text())
    if m.get("format") != "mapet_ds-offline-1":
        raise StageError(f"{path}: not a mapet_ds staging manifest (format {m.get('format')!r})")
    return m


def format_mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def describe(manifest: dict) -> List[str]:
    """The plan as lines: every batch in sending order, its files and sizes."""
    lines = []
    for b in manifest["batches"]:
        lines.append(f"batch {b['name']}: {format_mib(b['bytes'])}, {len(b['files'])} file(s)")
        for f in b["files"]:
            lines.append(f"    {f['file']:70s} {format_mib(f['bytes']):>10s}")
    return lines


def find_files(root: Path, names: Iterable[str]) -> Dict[str, Optional[Path]]:
    """Where each name lies under ``root`` (the batches may be copied side by side or merged)."""
    wanted = set(names)
    found: Dict[str, Optional[Path]] = {n: None for n in wanted}
    for p in sorted(Path(root).rglob("*")):
        if p.name in wanted and found[p.name] is None and p.is_file() and not p.is_symlink():
            found[p.name] = p
    return found
