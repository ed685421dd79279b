"""Durable file I/O below every other flgengine module: atomic writes, sha256, and
safetensors reading that checks the file before trusting it (never pickle).

`flgengine.bundle` re-exports these names; code outside flgengine imports them from there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "BundleError",
    "PICKLE_SUFFIXES",
    "atomic_replace",
    "atomic_write_text",
    "atomic_save_safetensors",
    "staged_directory",
    "replace_directory",
    "check_replaceable",
    "file_sha256",
    "cached_sha256",
    "check_safetensors_file",
    "load_safetensors",
    "check_state_dict",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class BundleError(ValueError):
    """A bundle (or weights file) is missing, malformed or inconsistent."""


# ---- atomic writes ---------------------------------------------------------------------

def atomic_replace(path: str | Path, write: Callable[[str], Any]) -> None:
    """Writes through `write(tmp_path)` to a temp file beside `path`, fsyncs, renames: a
    crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a bundle is an ordinary readable file
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # an I/O failure (full disk, file size limit) as the OSError it is
            code = re.search(r"os error (\d+)", str(e))
            n = int(code.group(1)) if code else errno.EIO
            raise OSError(n, os.strerror(n), str(path)) from e

    atomic_replace(Path(path), write)


# ---- whole directories ---------------------------------------------------------------------
# A bundle or an engine is a directory of several files that belong together: it is written
# whole into a fresh hidden directory beside its target (`.NAME.partial-XXXX`), fsynced, and
# then put in place, so a reader never sees a mix of an old and a new version.

def _readable_temp_dir(out: Path, tag: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary readable directory
    return tmp


def _fsync_tree(root: Path) -> None:
    """fsyncs every file and directory under `root` (and `root`)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def _directory_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on the hidden file `.NAME.lock` beside `out` (kept: removing a lock
    file races with its next taker)."""
    import fcntl

    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def replace_directory(new: str | Path, out: str | Path) -> None:
    """Puts the complete directory `new` at `out` (absent, or an older version, which is removed).

    Under a lock beside `out`, so two writers finish one after the other (the last one wins,
    never a mix); in one step where the system can swap two paths (Linux), else the old one is
    moved aside first (a kill between the two renames leaves no `out`, never a mix).
    """
    new, out = Path(new), Path(out)
    _fsync_tree(new)
    with _directory_lock(out):
        if not os.path.lexists(out):
            os.replace(new, out)
        elif out.is_dir() and not out.is_symlink() and _exchange(new, out):
            shutil.rmtree(new)  # which now holds the old version
        else:
            aside = _readable_temp_dir(out, "old")
            os.replace(out, aside / "old")
            os.replace(new, out)
            shutil.rmtree(aside, ignore_errors=True)
        _fsync_dir(out.parent)


def check_replaceable(out: str | Path, marker: str, what: str, error: type[Exception] = BundleError) -> None:
    """`error` unless `out` is absent, an empty directory, or a directory holding `marker`
    (an older `what`): a save never replaces a directory of other things."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise error(f"{out} exists and is not a directory; refusing to replace it with {what}")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise error(f"{out} exists and is not {what} (it has no {marker}); refusing to replace it "
                          "(choose another path or empty it)")


@contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """Yields a fresh directory to write a whole `out` into; when the block ends without an
    exception it replaces `out` (replace_directory), else it is removed and `out` is untouched."""
    out = Path(out)
    tmp = _readable_temp_dir(out, "partial")
    try:
        yield tmp
        replace_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_HASHES: dict[tuple, str] = {}


def cached_sha256(path: str | Path) -> str:
    """file_sha256, remembered per (path, size, mtime, ctime): a file hashed once is not read
    again in this process unless it changes (ctime cannot be set back by its writer)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


# ---- safetensors reading ---------------------------------------------------------------

def check_safetensors_file(path: str | Path, where: str) -> dict[str, Any]:
    """Reads and checks a safetensors header without loading tensors; returns it.

    Refuses pickle / torch.save files outright and detects truncation.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # of the file opened (a writer may replace the path meanwhile)
        head = f.read(9)  # 8-byte header length, then the JSON header's "{"
        is_zip = head[:4] == b"PK\x03\x04"  # torch.save's zip format
        is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[8:9] != b"{"
        if is_zip or is_pickle:
            raise BundleError(f"{where}: is a pickle / torch.save file; flgengine loads safetensors only "
                              "(convert it with safetensors.torch.save_file)")
        if len(head) < 9:
            raise BundleError(f"{where}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head[:8])
        if n <= 0 or 8 + n > size:
            raise BundleError(f"{where}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            f.seek(8)
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BundleError(f"{where}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BundleError(f"{where}: not a safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        end = info.get("data_offsets", [0, math.inf])[1] if isinstance(info, dict) else math.inf
        if end > data_size:
            raise BundleError(f"{where}: truncated: tensor {key!r} ends at byte {end} of a {data_size}-byte data section")
    return header


def load_safetensors(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked first (check_safetensors_file); a
    `BundleError` naming `where` if it is not a readable safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_file(path, where)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{where}: cannot read safetensors ({e})") from None


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str, source: str) -> None:
    """`BundleError` unless `sd` holds exactly the `expected` keys and shapes, in finite
    floating point (`source`: what implies the expectation, e.g. "config.json")."""
    missing = [k for k in expected if k not in sd]
    if missing:
        raise BundleError(f"{where}: missing tensor {missing[0]!r} (and {len(missing) - 1} more) required by {source}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise BundleError(f"{where}: unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) not in {source}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise BundleError(f"{where}: tensor {k!r} has shape {tuple(sd[k].shape)} but {source} implies {tuple(shape)}")
        if not sd[k].is_floating_point():
            raise BundleError(f"{where}: tensor {k!r} has dtype {sd[k].dtype}, expected a floating point dtype")
        if not torch.isfinite(sd[k] if sd[k].element_size() > 1 else sd[k].float()).all():  # (e4m3: via fp32)
            raise BundleError(f"{where}: tensor {k!r} contains NaN or Inf values")
