"""How many CPU threads a command-line run uses: the cores this process may run on, shared with the other
forethought runs of this user on this machine, fixed for the whole run (a run's numbers may depend on its thread
count: results, caches and checkpoints record it, and ``--threads N`` repeats it).

The rule: each run registers its claim in a folder of the system's temporary directory and waits half a second
for runs started with it; then it takes the cores no settled claim holds, shared with the runs still waiting (at
least one thread). So two runs started together on 2 cores take one thread each, three on 6 cores two each, and
a run started beside a running one takes what is left; a stopped run (SIGSTOP, Ctrl-Z) holds none while stopped
(docs/performance.md: what each costs, and when ``OMP_WAIT_POLICY=PASSIVE`` helps).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from forethought.core.errors import ForethoughtError

SETTLE_SECONDS = 0.5  # how long a starting run waits for others started with it
UNSETTLED = "?"  # a claim's text while its run waits


def registry() -> Path:
    """The folder of claims: one file per running forethought process, named by its pid, holding its threads."""
    folder = Path(tempfile.gettempdir()) / f"forethought-threads-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    status = folder.lstat()  # a shared temporary directory: the folder must be this user's own, not a link
    if folder.is_symlink() or status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise ForethoughtError(f"{folder} is not this user's private folder (a link, another owner, or open to "
                               "others): remove it, or give `threads` N")
    return folder


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_settled: dict[Path, int] = {}  # this process's claim, per registry: a second run in one process keeps it


def claim_threads(requested: int | None = None, folder: Path | None = None, cores: int | None = None,
                  settle: float = SETTLE_SECONDS) -> int:
    """Register this process's claim and return its thread count: ``requested`` where given, otherwise the
    rule above (decided once per process) over ``cores`` (default: :func:`available_cores`) and the claims in
    ``folder`` (default: :func:`registry`), after waiting ``settle`` seconds for runs started together. The claim
    is removed when the process exits."""
    if requested is not None and requested < 1:
        raise ForethoughtError(f"threads must be ≥ 1, got {requested}")
    if folder is None:
        try:
            folder = registry()
        except ForethoughtError:
            if requested is None:
                raise
            return requested  # asked for: no claim to register where the registry cannot be trusted
    if requested is None and folder in _settled:
        return _settled[folder]
    mine = folder / str(os.getpid())
    cores = cores or available_cores()
    with _locked(folder):
        mine.write_text(str(requested) if requested else UNSETTLED)
    atexit.register(mine.unlink, missing_ok=True)
    if requested is not None:
        return requested
    time.sleep(settle)
    with _locked(folder):
        others = _claims(folder, but=mine)
        starting = sum(1 for claim in others.values() if claim is None)  # started with us, not settled yet
        taken = sum(claim for claim in others.values() if claim is not None)
        threads = max(1, (cores - taken) // (starting + 1))  # what is free, shared with those still settling
        mine.write_text(str(threads))
    _settled[folder] = threads
    return threads


def _claims(folder: Path, but: Path) -> dict[int, int | None]:
    """{pid: threads (None: still settling)} of the other live claims; claims of processes gone are removed."""
    claims = {}
    for path in folder.iterdir():
        if path == but or not path.name.isdigit():
            continue
        if not _alive(int(path.name)):
            path.unlink(missing_ok=True)
            continue
        if _stopped(int(path.name)):
            continue  # a stopped run (SIGSTOP, Ctrl-Z) holds no cores while it stays stopped; its claim stays
        text = path.read_text().strip()
        claims[int(path.name)] = int(text) if text.isdigit() else None
    return claims


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (state T or t in ``/proc/<pid>/stat``); False where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("T", "t")  # the state follows the command name in parentheses


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The registry's lock, held while claims are read or written (released when the file closes)."""
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextmanager
def using_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``threads`` within the context, restored afterwards."""
    import torch  # here, not above: the command line decides its threads before torch loads

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thread_settings() -> dict[str, int | bool]:
    """What a run records beside its numbers, which may depend on them: torch's intra-op threads and whether
    deterministic algorithms are on (``meta.json``, a cache's ``meta.json``, a checkpoint's ``forethought.json``)."""
    import torch  # here, not above: the command line decides its threads before torch loads

    return {"threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
