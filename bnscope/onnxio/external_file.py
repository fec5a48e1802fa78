"""Append tensor bytes to an external data file, copying ranges of other files in the kernel.

Big tensors start on a page boundary (so runtimes can map them); ranges of other files go through
``os.copy_file_range`` where the kernel supports it, so untouched tensors never pass through Python.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bnscope.errors import BnscopeError

# Big tensors start on a page boundary in the data file, so runtimes can map them.
_ALIGN, _ALIGN_FROM = 4096, 1 << 20
_CAST_BLOCK = 1 << 20  # bytes cast and written at a time when spilling


def _byte_view(value: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


class DataFile:
    """Appends tensor bytes to an external data file; each append returns where it starts.

    Big tensors start on a page boundary. Ranges of other files are copied in the kernel
    (``os.copy_file_range``) where it can, so untouched tensors never pass through Python.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def __enter__(self) -> DataFile:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o666)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def append_bytes(self, data) -> int:
        view = memoryview(data).cast("B")
        offset = self._start(len(view))
        write_all(self.fd, view)
        return offset

    def append_cast(self, value: np.ndarray, dtype: np.dtype) -> int:
        """Appends ``value.astype(dtype)`` block by block: the same numbers without a full-size
        cast copy (a multi-GB fold would fault in a fresh one per weight)."""
        flat = np.ascontiguousarray(value).reshape(-1)
        offset = self._start(flat.size * dtype.itemsize)
        step = max(1, _CAST_BLOCK // dtype.itemsize)
        for i in range(0, flat.size, step):
            write_all(self.fd, _byte_view(flat[i : i + step].astype(dtype)))
        return offset

    def append_range(self, source: Path, offset: int, length: int) -> int:
        start = self._start(length)
        with open(source, "rb") as f:
            copied = _copy_in_kernel(f.fileno(), self.fd, offset, length)
            _copy_in_python(f, self.fd, offset + copied, length - copied, source)
        return start

    def _start(self, nbytes: int) -> int:
        end = os.lseek(self.fd, 0, os.SEEK_END)
        if nbytes < _ALIGN_FROM or end % _ALIGN == 0:
            return end
        write_all(self.fd, memoryview(bytes(_ALIGN - end % _ALIGN)))
        return end + _ALIGN - end % _ALIGN


def write_all(fd: int, view: memoryview) -> None:
    """Writes all of ``view`` to ``fd`` (one ``os.write`` may write less); every data-file write goes here."""
    while view:
        view = view[os.write(fd, view) :]


def _copy_in_kernel(src: int, dst: int, offset: int, length: int) -> int:
    """Copies what ``os.copy_file_range`` will; returns the bytes copied (0 where unsupported)."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, offset + done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):  # old kernel, other platform, cross-device on some kernels
        pass
    return done


def _copy_in_python(f, dst: int, offset: int, length: int, source: Path) -> None:
    f.seek(offset)
    while length > 0:
        chunk = f.read(min(length, 64 << 20))
        if not chunk:
            raise BnscopeError(
                f"external data file {source.name} ends {length} bytes early. "
                "Hint: the data file is incomplete; re-save or re-download the model"
            )
        write_all(dst, memoryview(chunk))
        length -= len(chunk)
