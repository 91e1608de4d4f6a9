"""Files a later run trusts: atomic writes, checked JSON, content digests, free space, and the run-folder lock.

Every file the workbench reads back (settings, progress, meta, caches, token files, checkpoints) is written
through here or with the same pattern: write a temporary sibling, ``fsync`` it, rename it over the final name,
``fsync`` the folder. A crash leaves the old file or the new one, never half of one. Content digests (BLAKE2b,
streamed in 16 MiB blocks) let a reader detect a file changed after it was written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from forethought.core.errors import ForethoughtError

_BLOCK = 16 * 2**20
LOCK_FILE = ".forethought.lock"
_HELD: dict[Path, int] = {}  # folders this process holds the lock of → nesting depth


def cache_root() -> Path:
    """Where files made once and reused are kept (converted models, the offline GPT-2 tokenizer):
    ``$FORETHOUGHT_CACHE``, else ``$XDG_CACHE_HOME/forethought``, else ``~/.cache/forethought``."""
    if os.environ.get("FORETHOUGHT_CACHE"):
        return Path(os.environ["FORETHOUGHT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forethought"


def check_out_folder(out: str | Path) -> Path:
    """``out`` as a path, refusing one that names a file: every ``--out`` is a folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ForethoughtError(f"`out` {out} is a file, not a folder")
    return out


def fsync_folder(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling, fsync and rename."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.unlink(missing_ok=True)  # a leftover (or a planted link): removed, never written through
    try:
        with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """``value`` as JSON at ``path``, atomically."""
    atomic_write_text(path, json.dumps(value, indent=indent, default=str) + "\n")


@contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """Write a folder atomically: the block fills the yielded staging folder (a sibling of ``final``); on
    success every file is fsynced and the staging folder replaces ``final`` whole. On failure it is removed
    and ``final`` is left as it was."""
    final = Path(final)
    staging = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    remove_path(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as written:
                    os.fsync(written.fileno())
        remove_path(final)  # replaced whole, never merged
        os.replace(staging, final)
        fsync_folder(final.parent)
    finally:
        remove_path(staging)


def remove_path(path: str | Path) -> None:
    """Remove a folder, file or symbolic link at ``path`` (a link itself, never what it points to)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def read_json(path: str | Path, rebuild: str = "") -> dict[str, Any]:
    """The JSON object at ``path``; a missing, torn, non-JSON or too deeply nested file, or one holding anything
    but an object, is a one-line error (``rebuild``: what to do)."""
    then = f"; {rebuild}" if rebuild else ""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ForethoughtError(f"{path} is missing{then}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ForethoughtError(f"{path} is damaged ({error}){then}") from None
    except RecursionError:
        raise ForethoughtError(f"{path} is damaged (nested too deeply to read){then}") from None
    if not isinstance(value, dict):
        raise ForethoughtError(f"{path} is damaged (it holds a JSON {type(value).__name__}, not an object){then}")
    return value


def file_digest(path: str | Path) -> str:
    """BLAKE2b-128 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as source:
        while block := source.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_digest(path: str | Path, expected: str, rebuild: str) -> None:
    """Refuse a file whose content changed since its digest ``expected`` was recorded."""
    try:
        found = file_digest(path)
    except OSError as error:
        raise ForethoughtError(f"{path} cannot be read ({error.strerror}); {rebuild}") from None
    if found != expected:
        raise ForethoughtError(
            f"{path} was changed or damaged after it was written (content digest differs); {rebuild}"
        )


DIGESTS_FILE = "digests.json"  # a folder's content digests: {relative path: BLAKE2b-128}


def write_folder_digests(folder: str | Path) -> None:
    """Record the content digest of every file under ``folder`` (before it is final: inside a staged folder)."""
    folder = Path(folder)
    digests = {str(path.relative_to(folder)): file_digest(path) for path in sorted(folder.rglob("*"))
               if path.is_file() and path.name != DIGESTS_FILE}
    (folder / DIGESTS_FILE).write_text(json.dumps(digests, indent=1) + "\n")


def check_folder_digests(folder: str | Path, rebuild: str) -> None:
    """Refuse a folder any of whose recorded files is missing or changed (a folder written before digests were
    recorded has none to check)."""
    folder = Path(folder)
    if (folder / DIGESTS_FILE).is_file():
        for name, digest in read_json(folder / DIGESTS_FILE, rebuild).items():
            check_digest(folder / name, digest, rebuild)


def size_text(n_bytes: float) -> str:
    """``n_bytes`` readably: ``"12 KiB"``, ``"340 MiB"``, ``"3.40 GiB"``."""
    if n_bytes < 2**20:
        return f"{n_bytes / 2**10:.0f} KiB"
    return f"{n_bytes / 2**20:.0f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:.2f} GiB"


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse before writing when the disk holding ``folder`` (or its nearest existing parent) has less than
    ``needed`` bytes free; ``what`` names the job in the message."""
    existing = next(p for p in [Path(folder), *Path(folder).absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ForethoughtError(f"{what} needs about {size_text(needed)} in {folder}; only {size_text(free)} free")


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the files under ``folder`` (0 if there is none)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold ``folder``'s writer lock (an ``flock`` on ``folder/.forethought.lock``) for the block.

    A second process asking for the same folder is refused at once with who holds it; the holding process may
    nest the lock. The kernel releases the lock when the holder exits, however it exits, so a crash never
    leaves a folder locked. A folder the lock created is removed again if nothing else was written into it
    (a run refused after the lock was taken leaves nothing behind), and so is a lock file it created in a folder that
    was there when the run fails; a lock file that was there keeps its content.
    A lock file that is a symbolic link is refused, never written through.
    """
    folder = Path(folder).absolute()
    if folder in _HELD:
        _HELD[folder] += 1
        try:
            yield
        finally:
            _HELD[folder] -= 1
        return
    created = not folder.exists()
    lock_was_there = (folder / LOCK_FILE).exists() or (folder / LOCK_FILE).is_symlink()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        reason = "a symbolic link" if (folder / LOCK_FILE).is_symlink() else error.strerror
        raise ForethoughtError(f"cannot take the lock {folder / LOCK_FILE}: it is {reason}; remove it") from None
    before = os.pread(descriptor, os.fstat(descriptor).st_size, 0)  # all of it: put back as it was
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "another process"
            raise ForethoughtError(
                f"{folder} is being written by {holder}; wait for it or choose another folder"
            ) from None
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since {started} "
                              f"({' '.join(sys.argv[:3])})".encode(), 0)
        _HELD[folder] = 1
        try:
            yield
        except BaseException:
            if not lock_was_there and not created:  # a refused or failed run leaves a folder as it found it
                (folder / LOCK_FILE).unlink(missing_ok=True)
            raise
        finally:
            del _HELD[folder]
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, before, 0)  # as it was: empty if this lock made it
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(folder)
    finally:
        os.close(descriptor)  # releases the lock
