"""Atomic folder writes: a checkpoint folder is either the previous one or the new one, complete, at every moment.

:func:`atomic_folder` yields a fresh temporary folder beside the target; the caller writes everything into it and, on
normal exit, the temporary folder replaces the target in one step. On Linux this is ``renameat2`` (``RENAME_EXCHANGE``
swaps two directories atomically, ``RENAME_NOREPLACE`` refuses when another writer created the target meanwhile);
elsewhere two renames move the old folder aside and the new one in, so a reader sees the old folder, no folder, or
the new folder, never a mix. A crash between those two renames leaves the old folder under a hidden name; the next
writer puts it back.

Each writer holds an exclusive ``flock`` on a lock file beside its temporary folder, so leftovers of dead processes
(killed mid-save) are told apart from folders still being written, and are removed by the next writer.
"""

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers are then never removed automatically
    fcntl = None  # type: ignore[assignment]

#: infix of the hidden sibling names: ``.<target>.optimum-bc-<kind>.<unique>``.
_TAG = ".optimum-bc-"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the platform or file system lacks it (caller falls back)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself, so a power loss after the swap cannot leave empty files behind."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_abandoned(lock_path: Path) -> bool:
    """Whether nobody holds the lock file (its writer died); False where flock is unavailable."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return True


def cleanup_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary folders of dead writers of ``target``; restore a moved-aside old folder if needed.

    Returns the removed paths. Folders of live writers (their lock is held) are left alone.
    """
    target = Path(target).absolute()
    removed = []
    prefix = f".{target.name}{_TAG}"
    names = sorted(n for n in os.listdir(target.parent) if n.startswith(prefix) and n.endswith(".lock"))
    for lock in (target.parent / n for n in names):
        if not _is_abandoned(lock):
            continue
        data = lock.with_suffix("")
        if data.name.startswith(f"{prefix}old.") and data.is_dir() and not target.exists():
            os.rename(data, target)  # crashed between the two fallback renames: the old folder comes back
        elif data.exists():
            shutil.rmtree(data, ignore_errors=True)
            removed.append(data)
        lock.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def _sibling(target: Path, kind: str) -> Iterator[Path]:
    """A new uniquely named hidden folder beside ``target``, guarded by a held lock for as long as the block runs.

    The lock is taken on a file with a private name and only then renamed to the name cleanup looks at, so cleanup
    never sees the lock of a live writer unheld.
    """
    path = target.parent / f".{target.name}{_TAG}{kind}.{uuid.uuid4().hex[:12]}"
    lock = path.with_name(path.name + ".lock")
    pending = path.with_name(path.name + ".pending")
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(pending, lock)
        path.mkdir()
        yield path
    finally:
        if path.is_symlink():  # a swapped-out target that was a link: remove the link, never what it points to
            path.unlink()
        shutil.rmtree(path, ignore_errors=True)
        lock.unlink(missing_ok=True)
        pending.unlink(missing_ok=True)
        os.close(fd)


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ValueError(f"{os.fspath(target)!r} exists and is not a folder; pass a folder path to save into")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise ValueError(
            f"{os.fspath(target)!r} exists and is not empty; choose a new folder or remove it first "
            "(nothing is overwritten)"
        )


def _swap_in(new: Path, target: Path, overwrite: bool) -> None:
    """Make ``new`` become ``target``; afterwards ``new`` holds the old content (or nothing) and may be removed."""
    if not target.exists():
        try:
            if _renameat2(new, target, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            pass  # appeared meanwhile: handled below as an existing target
        else:
            if not target.exists():
                os.rename(new, target)
                return
    _check_target(target, overwrite)  # again: another writer may have filled it since we started
    if _renameat2(new, target, _RENAME_EXCHANGE):
        return
    with _sibling(target, "old") as old:
        old.rmdir()
        os.rename(target, old)  # readers now see no folder (a clear "not found"), never a half-replaced one
        os.rename(new, target)  # the old content is removed when the block ends


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str], *, overwrite: bool) -> Iterator[Path]:
    """Write a folder atomically: yields a fresh temporary folder beside ``target`` that replaces it on normal exit.

    Args:
        target: the folder to create or replace (its parent is created if missing).
        overwrite: replace an existing non-empty ``target``; when False that raises ``ValueError`` before anything is
            written, and again at the swap if another writer filled ``target`` in the meantime.

    On an exception the temporary folder is removed and ``target`` is untouched. The old content is deleted only
    after the swap. Concurrent writers never share a temporary folder; the last one to finish wins (overwrite=True)
    or the later ones fail (overwrite=False).
    """
    target = Path(target).absolute()
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup_leftovers(target)
    with _sibling(target, "tmp") as tmp:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, target, overwrite)
        _fsync_dir(target.parent)
