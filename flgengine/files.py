"""Durable file I/O below every other flgengine module: atomic writes, sha256, and
safetensors reading that checks the file before trusting it (never pickle).

`flgengine.bundle` re-exports these names; code outside flgengine imports them from there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "BundleError",
    "PICKLE_SUFFIXES",
    "atomic_replace",
    "atomic_write_text",
    "atomic_save_safetensors",
    "file_sha256",
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

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
