"""Thread claims: runs started together share the cores, a run beside a running one takes what is left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forethought.core.errors import ForethoughtError
from forethought.core.threads import claim_threads

ROOT = Path(__file__).resolve().parents[2]


def _claims_of_processes_started_together(folder: Path, cores: int, n: int) -> list[int]:
    script = ("import sys, time; from pathlib import Path; from forethought.core.threads import claim_threads\n"
              f"print(claim_threads(folder=Path({str(folder)!r}), cores={cores}, settle=2)); sys.stdout.flush(); "
              "time.sleep(2)")  # settle=2: every process has registered before the first decides
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return sorted(int(run.communicate()[0]) for run in runs)


@pytest.mark.parametrize("cores, n, shares", [(2, 2, [1, 1]), (4, 2, [2, 2]), (2, 3, [1, 1, 1]), (6, 3, [2, 2, 2])])
def test_runs_started_together_share_the_cores(tmp_path, cores, n, shares):
    assert _claims_of_processes_started_together(tmp_path, cores, n) == shares
    assert list(tmp_path.glob("[0-9]*")) == []  # claims leave with their processes


def test_a_run_alone_takes_every_core_and_beside_others_what_is_left(tmp_path):
    assert claim_threads(folder=tmp_path, cores=4, settle=0) == 4
    assert claim_threads(folder=tmp_path, cores=4, settle=0) == 4  # decided once per process
    others = tmp_path / "other"
    others.mkdir()
    (others / "1").write_text("3")  # pid 1 lives (init) and holds 3 of 4 cores
    (others / "999999999").write_text("2")  # a claim whose process is gone: cleared
    assert claim_threads(folder=others, cores=4, settle=0) == 1
    assert not (others / "999999999").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "1").write_text("8")
    assert claim_threads(folder=full, cores=4, settle=0) == 1  # at least one
    assert claim_threads(3, folder=full, cores=4) == 3  # asked for: given, whatever the others hold
    with pytest.raises(ForethoughtError, match="threads must be ≥ 1, got 0"):
        claim_threads(0, folder=tmp_path)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc to read a process's state from")
def test_a_stopped_run_holds_no_cores_while_it_is_stopped(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running, stopped = tmp_path / "running", tmp_path / "stopped"  # a folder each: a claim is decided once
        for folder in (running, stopped):
            folder.mkdir()
            (folder / str(sleeper.pid)).write_text("3")
        assert claim_threads(folder=running, cores=4, settle=0) == 1
        sleeper.send_signal(signal.SIGSTOP)
        for _ in range(100):  # the state changes asynchronously
            if Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                break
            time.sleep(0.05)
        assert claim_threads(folder=stopped, cores=4, settle=0) == 4
        assert (stopped / str(sleeper.pid)).read_text() == "3"  # kept: continued, it holds its cores again
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_registry_that_is_not_the_users_own_folder_is_refused(tmp_path, monkeypatch):
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    (tmp_path / f"forethought-threads-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(ForethoughtError, match="is not this user's private folder .* give `threads` N"):
        claim_threads()
    assert claim_threads(2) == 2 and list(elsewhere.iterdir()) == []  # asked for: nothing written there
