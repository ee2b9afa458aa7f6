"""Crash-safe file writing and checksums.

Every artifact the pipeline caches (decompressed datasets, trained weights,
JSON sidecars) is written through these helpers, so a reader never sees a
half-written file: data goes to a temporary file in the destination directory,
is fsynced, and then atomically renamed over the target with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_path",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "sha256_file",
]

_HASH_CHUNK_BYTES = 1 << 20
_FILE_MODE = 0o644


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is flushed; some
    # platforms/filesystems refuse to open directories, which is harmless.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` atomically on success.

    The caller writes the complete file to the yielded path (e.g. with
    ``torch.save`` or ``safetensors.torch.save_file``). When the block exits
    normally the file is fsynced and renamed onto ``path``; when it raises,
    the temporary file is removed and ``path`` is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Final destination. Parent directories are created if needed.

    Yields
    ------
    pathlib.Path
        Temporary file in the same directory as ``path`` (same filesystem,
        so ``os.replace`` is atomic).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files (and some writers recreate the file), so the
        # mode is set after writing: cached artifacts are shared read-only files.
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    data : bytes
        Full file content.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    text : str
        Full file content.
    encoding : str, default "utf-8"
        Text encoding.
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically.

    Parameters
    ----------
    obj : Any
        Object to serialize, typically a state dict.
    path : str or os.PathLike
        Destination file.
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a flat tensor dict as ``.safetensors`` atomically.

    Parameters
    ----------
    tensors : Mapping[str, torch.Tensor]
        Tensors to store; made contiguous and detached first because
        safetensors rejects views and non-contiguous storage.
    path : str or os.PathLike
        Destination file.
    metadata : Mapping[str, str], optional
        String key/value header metadata.
    """
    from safetensors.torch import save_file

    flat = {key: value.detach().contiguous() for key, value in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata else None)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 digest of a file, read in 1 MiB chunks.

    Parameters
    ----------
    path : str or os.PathLike
        File to hash.

    Returns
    -------
    str
        64-character lowercase hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
