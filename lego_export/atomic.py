"""Safe output: every file the tools write appears whole or not at all (torch-free).

- :func:`atomic_write` creates an unpredictable temporary file exclusively in the target's folder
  (``O_EXCL | O_NOFOLLOW``: a symlink planted there is never followed), hands the writer that open
  file, fsyncs it and renames it onto the target.
- :func:`staging_dir` is the same for a set of files: a private folder published in one move.
- :func:`build_folder` and :func:`publish_folder` are that for a whole output folder (an engines
  folder): it is staged beside its target, under a lock, and replaces the target in one rename.
- Both carry the writing process's id in their names; :func:`clean_stale` removes those whose
  process has died (``kill -9``, power loss), and runs before every new write into that folder.
- :func:`check_output` refuses an output path that cannot be written, before any work starts.
- :func:`folder_lock` keeps two processes from writing one output folder at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Set
from pathlib import Path
from typing import BinaryIO

from lego_export.errors import LegoError

_TEMP, _STAGING = ".lego-tmp", ".lego-staging"
_OURS = re.compile(rf"^\..+\.(\d+)\.[^.]+({re.escape(_TEMP)}|{re.escape(_STAGING)})$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove temporary files and staging folders left in folder by processes that no longer run."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            match = _OURS.match(entry.name)
            if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


_CLEANED: set[Path] = set()


def _clean_once(folder: Path) -> None:
    """clean_stale, once per folder per process: writing n files into one folder (an --out-dir) must
    not scan it n times."""
    key = folder.resolve()
    if key not in _CLEANED:
        clean_stale(key)
        _CLEANED.add(key)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_UMASK = os.umask(0)  # read once, at import (before any thread writes), and put back at once
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on success it replaces path whole, otherwise it is removed.

    A symlink at path itself is replaced, never written through.
    """
    path = Path(path)
    with _one_line(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(path.parent)
        # mkstemp opens with O_CREAT | O_EXCL (and O_NOFOLLOW where the OS has it) under a random name.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=_TEMP)
    try:
        with _one_line(path):
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # as open() would make it: mkstemp makes 0600
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _one_line(path: Path) -> Iterator[None]:
    """Any OSError while writing path becomes one line naming it (a full disk, a read-only or pseudo
    file system, an immutable file)."""
    try:
        yield
    except OSError as e:
        raise LegoError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """A private, empty folder beside target to write a set of files into; removed afterwards unless
    the caller moved it into place (see :func:`publish_dir`)."""
    target = Path(target)
    with _one_line(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(target.parent)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=_STAGING))
    try:
        with _one_line(target):
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_dir(staging: Path, target: Path) -> None:
    """Move a staging folder's files to target: in one rename when target is new or empty, else file by
    file (each file whole)."""
    with contextlib.suppress(OSError):
        target.rmdir()  # only succeeds when empty
    if not target.exists():
        os.replace(staging, target)
        staging.mkdir()  # staging_dir removes it on exit
    else:
        for entry in sorted(staging.iterdir()):
            os.replace(entry, target / entry.name)
    _fsync_dir(target.parent)


def check_output(path: str | Path | None, option: str, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: an empty name, a directory where a
    file is wanted (or the reverse), or a parent folder that is not a writable folder."""
    if path is None:
        return
    if str(path).strip() == "":
        raise LegoError(f"{option} is empty: name a {'folder' if folder else 'file'} to write")
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise LegoError(f"{option} {path} is {kind}; give a {'folder' if folder else 'file'} path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LegoError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LegoError(f"{option} {path}: cannot write in {parent} (permission denied)")
    try:  # os.access says yes to root everywhere: try what the write will do (a pseudo or read-only file system)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".lego-probe.", suffix=_TEMP)
        os.close(fd)
        os.unlink(probe)
        if path.is_file() or path.is_symlink():  # an immutable file cannot be replaced
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOFOLLOW))
    except OSError as e:
        if not (path.is_symlink() and e.errno == errno.ELOOP):  # a symlink is replaced, never written through
            raise LegoError(f"{option} {path}: cannot write there ({e.strerror or e})") from None


def _lock_fd(folder: Path, what: str, writing: Path) -> int:
    """An open descriptor of folder holding an exclusive flock; one line if another process holds it."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise LegoError(f"cannot lock {writing} for writing ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise _busy(what, writing) from None
        raise
    return fd


def _busy(what: str, folder: Path) -> LegoError:
    return LegoError(f"another {what} is writing to {folder}; wait for it or choose another folder")


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on an output folder (flock on the folder itself: no lock file is left
    behind) for as long as we write it; refuse at once, in one line, if another process holds it."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        fd = _lock_fd(folder, what, folder)
        yield
    finally:
        if fd is not None:
            os.close(fd)
        if created:  # nothing was written: leave no trace
            with contextlib.suppress(OSError):
                folder.rmdir()


class FolderBuild:
    """A folder being built beside its target (see :func:`build_folder`)."""

    def __init__(self, target: Path, staging: Path, what: str, locks: list[int]):
        self.target, self.staging, self.what, self._locks = target, staging, what, locks
        self.target_locked = bool(locks[1:])

    def lock_target(self) -> None:
        """Lock the target too, if it exists now and is not locked yet (it appeared during the build)."""
        if not self.target_locked and self.target.is_dir():
            self._locks.append(_lock_fd(self.target, self.what, self.target))
            self.target_locked = True


@contextlib.contextmanager
def build_folder(target: str | Path, what: str) -> Iterator[FolderBuild]:
    """A private staging folder beside target (``.<name>.<pid>.<random>.lego-staging`` in its parent)
    to build a whole new target in, for :func:`publish_folder` to put in place.

    Refuses, in one line, while another process builds the same target: the target is locked when
    it exists, and every staging folder is locked by its builder, so a second build sees the first
    even before the target exists (nothing is created at the target until publication). Staging
    folders of builders that died (``kill -9``) are removed first; a live builder's never are. The
    staging folder is removed on the way out, whatever happened.
    """
    target = Path(target)
    with _one_line(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target.parent)  # not _clean_once: a build's leftovers go at every build
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=_STAGING))
        os.chmod(staging, 0o777 & ~_UMASK)  # as mkdir would make it: mkdtemp makes 0700
    locks: list[int] = []
    try:
        locks.append(_lock_fd(staging, what, target))
        _refuse_other_builders(target, staging, what)
        if target.is_dir():
            locks.append(_lock_fd(target, what, target))
        with _one_line(target):
            yield FolderBuild(target, staging, what, locks)
    finally:
        for fd in locks:
            os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)


def _refuse_other_builders(target: Path, mine: Path, what: str) -> None:
    """Refuse if another live process stages the same target: its staging folder is locked. (Two that
    start at once may both refuse; they never both go on.)"""
    import fcntl

    sibling = re.compile(rf"^\.{re.escape(target.name)}\.\d+\.[^.]+{re.escape(_STAGING)}$")
    for entry in target.parent.iterdir():
        if entry == mine or not sibling.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # gone meanwhile: its builder finished
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise _busy(what, target) from None
        finally:
            os.close(fd)


def publish_folder(build: FolderBuild, drop: Set[str] = frozenset()) -> None:
    """Put the staging folder in the target's place in one rename.

    What the target holds besides the new files (notes, someone's files) is carried over as hard
    links first, except the names in drop (the old build's files the new one no longer lists). A new
    target appears whole; an old one is swapped for the new one atomically (renameat2 exchange),
    or, where the system has no exchange, renamed aside first: a kill between the two renames then
    leaves no target rather than a mixed one.
    """
    staging, target = build.staging, build.target
    build.lock_target()
    if target.is_dir():
        _carry_over(target, staging, drop)
        os.chmod(staging, target.stat().st_mode & 0o7777)  # the folder keeps its permissions
    _fsync_dir(staging)
    if not target.exists():
        os.rename(staging, target)
    elif not _exchange(staging, target):  # else staging now holds the old target: build_folder removes it
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=_STAGING))
        os.rename(target, aside)  # replaces the empty folder mkdtemp made
        os.rename(staging, target)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)


def _carry_over(target: Path, staging: Path, drop: Set[str]) -> None:
    """Hard-link into staging every entry of target that staging has no entry of that name for."""
    for entry in target.iterdir():
        name = entry.name
        if name in drop or (staging / name).exists() or (staging / name).is_symlink() or _OURS.match(name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, staging / name)


def _link_or_copy(src, dst) -> None:
    if Path(src).is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # the process's own libc (glibc 2.28+)
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
