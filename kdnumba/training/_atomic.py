"""Durable files: the one place where kdnumba.training writes to disk.

:func:`atomic_write` replaces a file so that a reader -- or a process restarted
after a crash or a power cut -- sees either the old complete file or the new
complete one, never a mixture, an empty file, or a truncated one:

1. create a temporary file with a unique name (random, not just the PID: two
   threads of one process must not share it) *in the target's directory* (a
   rename is atomic only within one file system);
2. write, flush and ``fsync`` it (without the fsync a crash after the rename can
   leave a zero-length file under the final name);
3. ``os.replace`` it over the target (atomic on POSIX and Windows);
4. ``fsync`` the directory, so that the rename itself is on disk.

If anything fails (or the process is interrupted in Python), the temporary file
is removed and the target is untouched. A process killed with ``SIGKILL``
mid-write leaves a temporary file behind -- named ``.<target name>.<random>.tmp``,
so :func:`remove_temp_files` can find it -- and, still, the previous target.

:func:`write_npz` / :func:`read_npz` add a SHA-256 of the arrays inside the
archive, so a file damaged after it was written (bit rot, a truncated copy, a
hand edit) is reported as :class:`CorruptFileError` instead of being loaded.
Used by :class:`~kdnumba.training.TeacherCache`, the :class:`~kdnumba.training.Distiller`
checkpoints and :meth:`~kdnumba.training.MLP.save`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Callable, Mapping
from typing import BinaryIO

import numpy as np

TEMP_SUFFIX = ".tmp"
_CHECKSUM_KEY = "__sha256__"


class CorruptFileError(ValueError):
    """A file exists but cannot be read back as what was written (empty,
    truncated, not an archive, a checksum mismatch, ...)."""


def temp_prefix(path) -> str:
    """The prefix of the temporary files :func:`atomic_write` makes for ``path``."""
    return f".{os.path.basename(os.fspath(path))}."


def is_temp_name(name: str, target_prefix: str = "") -> bool:
    """Whether ``name`` (a file name) is a temporary file of :func:`atomic_write`
    for a target whose name starts with ``target_prefix``."""
    return name.startswith("." + target_prefix) and name.endswith(TEMP_SUFFIX)


def fsync_directory(directory) -> None:
    """Flush a directory's entries (a rename inside it) to disk; a no-op where the
    platform or file system cannot (Windows, some network file systems)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _open_temp(path: str) -> tuple[int, str]:
    directory = os.path.dirname(os.path.abspath(path))
    prefix = temp_prefix(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{TEMP_SUFFIX}")
        try:
            # 0o666 & ~umask, like open(path, "wb"): a shared cache stays shareable.
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", path)


def atomic_write(path, write: Callable[[BinaryIO], object]) -> str:
    """Replace ``path`` atomically and durably with what ``write(file)`` writes.

    ``write`` gets a binary file object open on a temporary file next to
    ``path``. Returns ``path``. Raises what ``write`` or the file system raises
    (``OSError`` for a read-only folder or a full disk), with the temporary file
    removed and ``path`` as it was.
    """
    path = os.fspath(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))
    return path


def remove_temp_files(directory, target_prefix: str = "") -> int:
    """Delete the temporary files of :func:`atomic_write` in ``directory`` for
    targets whose names start with ``target_prefix`` (left behind by killed
    processes); returns how many were removed. A writer still using one of them
    fails its write, which the callers here survive (they warn)."""
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if is_temp_name(name, target_prefix):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))
                removed += 1
    return removed


# -- checksummed .npz archives ---------------------------------------------------------
def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(repr((key, a.dtype.str, a.shape)).encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def write_npz(path, arrays: Mapping[str, object]) -> str:
    """Write ``arrays`` (name -> array-like, no object arrays) to an ``.npz`` file
    with :func:`atomic_write`, with a SHA-256 of the contents that
    :func:`read_npz` checks. Returns ``path``."""
    arrs = {k: np.asarray(a) for k, a in arrays.items()}
    if _CHECKSUM_KEY in arrs:
        raise ValueError(f"{_CHECKSUM_KEY!r} is a reserved name")
    arrs[_CHECKSUM_KEY] = np.asarray(_digest(arrs))
    return atomic_write(path, lambda f: np.savez(f, **arrs))


def read_npz(path) -> dict[str, np.ndarray]:
    """The arrays of a :func:`write_npz` file.

    Raises ``FileNotFoundError`` if it does not exist, :class:`CorruptFileError`
    if it cannot be read or its checksum does not match (an empty, truncated or
    damaged file, or one not written by :func:`write_npz`).
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except Exception as exc:  # EOFError, BadZipFile, ValueError, OSError, zlib.error, ...
        if os.path.exists(path) and os.path.getsize(path) == 0:
            raise CorruptFileError(f"{path} is empty") from exc
        raise CorruptFileError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from exc
    stored = arrays.pop(_CHECKSUM_KEY, None)
    if stored is None:
        raise CorruptFileError(f"{path} has no checksum (not written by kdnumba.training)")
    if str(stored) != _digest(arrays):
        raise CorruptFileError(f"{path} is damaged (checksum mismatch)")
    return arrays


def probe_writable(directory) -> None:
    """Create ``directory`` if needed and check that a file can be created in it
    (a temporary file, removed at once); raises ``OSError`` otherwise. Works
    where ``os.access`` does not (as root, on read-only mounts, on full disks
    with no inode left)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _open_temp(os.path.join(directory, "probe"))
    os.close(fd)
    os.unlink(tmp)
