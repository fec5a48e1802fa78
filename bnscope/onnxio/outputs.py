"""Where bnscope may write: one rule for every output path (``-o``, ``--html``, ``--save-moments``,
``--save-baseline``), checked before any work starts.

An output path
- is never an input of the run: the model, its external data files, data files (or a file inside
  a data folder), the loader script, the config, a baseline; compared after resolving links, and by
  device and inode where the file exists (hard links);
- is a regular file or does not exist yet: folders, devices, FIFOs and sockets are refused, and so
  are symbolic links (the writers rename a new file over the path, which replaces the link itself:
  ``--html /dev/stdout`` turned the system's ``/dev/stdout`` link into a regular file);
- lies in a folder that this process can create files in. That is probed by creating and
  removing a temp file there (in the nearest existing folder above it when it is missing: missing
  folders are created when the output is written), which also catches read-only file systems,
  ``/proc``, and folders root may not write for other reasons.

An existing regular file is replaced, atomically: each writer writes a temp file in the same
folder (a hidden name ending in ``.tmp``) and renames it over the target, so a killed run leaves the
old file or the new one, never a partial one.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

from bnscope.errors import BnscopeError

PathLike = str | os.PathLike


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None]) -> None:
    """Refuse output paths that would destroy an input, are not plain files, or cannot be written.

    Args:
        outputs: option name (``"-o"``, ``"--html"``...) -> path; None entries are skipped.
        inputs: what the run reads (``"the model"``, ``"the data"``...) -> path (file or folder).

    Raises:
        BnscopeError: the first output that breaks the rule, with what to do.
    """
    given = {option: Path(path) for option, path in outputs.items() if path is not None}
    read = [(what, Path(path)) for what, path in inputs.items() if path is not None]
    seen: dict[Path, str] = {}
    for option, path in given.items():
        _check_not_an_input(option, path, read)
        key = _resolved(path)
        if key in seen:
            raise BnscopeError(f"{option} and {seen[key]} both name {path}. Hint: give each output its own file")
        seen[key] = option
        _check_not_a_link(option, path)
        _check_kind(option, path)
        _check_folder(option, path)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _check_not_an_input(option: str, path: Path, inputs: list[tuple[str, Path]]) -> None:
    target = _resolved(path)
    for what, source in inputs:
        origin = _resolved(source)
        if target == origin or _same_inode(path, source):
            raise BnscopeError(
                f"{option} {path} is {what} of this run; writing it would destroy it. Hint: choose another path"
            )
        if origin.is_dir() and origin in target.parents:
            raise BnscopeError(
                f"{option} {path} lies inside {what} ({source}), which this run reads. Hint: write it somewhere else"
            )


def _same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_not_a_link(option: str, path: Path) -> None:
    if path.is_symlink():
        raise BnscopeError(
            f"{option} {path} is a symbolic link (to {os.readlink(path)}); writing would replace the link, "
            "not the file it names. Hint: give the path of a regular file"
        )


def _check_kind(option: str, path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # the folder check says what is wrong
        return
    except OSError as exc:
        raise BnscopeError(f"{option} {path}: cannot look at it ({exc.strerror}). Hint: choose another path") from None
    if stat.S_ISREG(mode):
        return
    kind = "a folder" if stat.S_ISDIR(mode) else _special_kind(mode)
    hint = "name a file inside it" if stat.S_ISDIR(mode) else "write to a regular file"
    raise BnscopeError(f"{option} {path} is {kind}, not a regular file. Hint: {hint}")


def _special_kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _check_folder(option: str, path: Path) -> None:
    """The folder, or its nearest existing ancestor (missing folders are created when the output is
    written), must be a folder this process can create files in."""
    folder = Path(os.path.realpath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BnscopeError(f"{option} {path}: {folder} is not a folder. Hint: choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".bnscope-probe-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BnscopeError(
            f"{option} {path}: cannot create files in {folder} ({exc.strerror}). Hint: choose a writable folder"
        ) from None
    os.close(fd)
    os.unlink(probe)


def external_files(locations: Iterable[str], base_dir: PathLike) -> dict[str, Path]:
    """The model's external data files as run inputs, labelled for :func:`check_outputs`. A location
    holding a NUL byte names no file (loading the model refuses it with its own message)."""
    return {
        f"the model's external data file {name!r}": Path(base_dir) / name
        for name in sorted(set(locations))
        if "\x00" not in name
    }


def loader_file(loader: str | None) -> Path | None:
    """The script of a ``--loader file.py:func`` (None when not given)."""
    if not loader:
        return None
    return Path(loader.rpartition(":")[0] or loader)


@contextmanager
def writing(path: PathLike, what: str = "the output"):
    """Turn a failure while writing ``path`` (disk full, quota, a folder removed meanwhile) into one
    line and exit 2: the environment, not bnscope, is at fault. Missing folders are created first."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise BnscopeError(
            f"cannot write {what} {path} ({reason}). Hint: check free space and permissions, or choose another path"
        ) from exc


def temp_prefix(path: PathLike) -> str:
    """The start of a hidden temp name beside ``path``: a dot and at most 64 characters of its name, so
    the temp name stays within the 255 bytes a file name may have when ``path``'s own name is near it."""
    return f".{Path(path).name[:64]}."


def move_into_place(staged: PathLike, target: PathLike) -> Path:
    """Rename ``staged`` (in the system temp folder) to ``target``, atomically. Across file systems
    it is copied to a hidden ``.tmp`` file beside ``target`` first, then renamed, so ``target`` is
    the old file or the whole new one, never a part."""
    staged, target = Path(staged), Path(target)
    with writing(target):
        try:
            os.replace(staged, target)
            return target
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(staged, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 24)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        staged.unlink()
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_input_file(path: PathLike, what: str, hint: str) -> None:
    """An input named as a file must be a regular file: a FIFO or a device would block the read or
    never end (``/dev/zero``)."""
    path = Path(path)
    if not path.exists():
        raise BnscopeError(f"{what} not found: {path}. Hint: {hint}")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else _special_kind(os.stat(path).st_mode)
        raise BnscopeError(f"{what} {path} is {kind}, not a regular file. Hint: {hint}")


def write_text_atomically(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a hidden temp file beside ``path`` and rename it into place; the temp
    file is removed if anything goes wrong (Ctrl-C and SIGTERM included)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
