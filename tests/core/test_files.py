"""Files a later run trusts: atomic writes, checked JSON, content digests and the run-folder lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from forethought.core.errors import ForethoughtError, as_flags
from forethought.core.files import (
    LOCK_FILE,
    atomic_write_json,
    check_digest,
    file_digest,
    read_json,
    run_lock,
    staged_folder,
)

HOLD = """
import sys, time
from forethought.core.files import run_lock
with run_lock(sys.argv[1]):
    open(sys.argv[2], "w").close()
    time.sleep(60)
"""


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds (for up to a minute)."""
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run"), str(ready)],
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    while not ready.exists():
        assert holder.poll() is None, "the holding process died"
        time.sleep(0.05)
    yield tmp_path / "run", holder.pid
    holder.kill()
    holder.wait()


def test_a_second_writer_is_refused_with_who_holds_the_folder(held):
    folder, pid = held
    (folder / "precious").write_text("kept")
    with pytest.raises(ForethoughtError, match=rf"run is being written by pid {pid} on .* since .*; wait for it"):
        with run_lock(folder):
            pass
    assert (folder / "precious").read_text() == "kept"


def test_the_lock_goes_with_its_holder(held, tmp_path):
    folder, pid = held
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    with run_lock(folder):  # the kernel released the dead holder's lock
        assert (folder / LOCK_FILE).exists()


def test_the_holder_may_nest_its_lock_and_an_unused_folder_is_removed(tmp_path):
    with run_lock(tmp_path / "run"):
        with run_lock(tmp_path / "run"):
            pass
        assert (tmp_path / "run").is_dir()
    assert not (tmp_path / "run").exists()  # created by the lock, nothing written: gone again
    with run_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "file").write_text("x")
    assert (tmp_path / "kept" / "file").exists()


def test_atomic_json_round_trip_and_torn_json_is_one_line(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left
    (tmp_path / "a.json").write_text('{"x": [1,')
    with pytest.raises(ForethoughtError, match=r"a.json is damaged \(.*\); run it again"):
        read_json(tmp_path / "a.json", "run it again")
    with pytest.raises(ForethoughtError, match=r"b.json is missing"):
        read_json(tmp_path / "b.json")
    (tmp_path / "a.json").write_text("[1, 2]")
    with pytest.raises(ForethoughtError, match=r"a.json is damaged \(it holds a JSON list, not an object\)"):
        read_json(tmp_path / "a.json")
    (tmp_path / "a.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ForethoughtError, match=r"a.json is damaged \(nested too deeply to read\)"):
        read_json(tmp_path / "a.json")


def test_a_failed_run_leaves_no_lock_file_in_a_folder_it_found(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.csv").write_text("x\n")
    with pytest.raises(ForethoughtError), run_lock(tmp_path / "run"):
        raise ForethoughtError("refused")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["results.csv"]
    (tmp_path / "run" / LOCK_FILE).write_text("")  # a lock file that was there stays
    with pytest.raises(ForethoughtError), run_lock(tmp_path / "run"):
        raise ForethoughtError("refused")
    assert (tmp_path / "run" / LOCK_FILE).exists()


def test_messages_name_settings_as_fields_in_python_and_as_flags_on_the_command_line():
    message = "give `max_sequences` above 1, or `corpus` embedded; `weights_only` is torch's; `forethought probe`"
    assert as_flags(message, {"max_sequences", "corpus"}) == (
        "give --max-sequences above 1, or --corpus embedded; `weights_only` is torch's; `forethought probe`")


def test_a_digest_catches_one_flipped_bit(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    digest = file_digest(path)
    check_digest(path, digest, "rebuild")
    data = bytearray(path.read_bytes())
    data[123_456] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ForethoughtError, match=r"f.bin was changed or damaged after it was written .*; rebuild"):
        check_digest(path, digest, "rebuild")


def test_a_staged_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with staged_folder(final) as staging:
            (staging / "new").write_text("new")
            raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (final / "old").exists()
    with staged_folder(final) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_nothing_is_written_through_a_symbolic_link(tmp_path, capsys):
    """The second attack's finding: a lock file linked to a user's file overwrote it, even on bad input. Lock,
    atomic writes and staged folders never follow a link; a refused run leaves the folder as it was."""
    from forethought.analyses.cli import main

    victim, run = tmp_path / "victim.txt", tmp_path / "runx"
    victim.write_text("precious")
    run.mkdir()
    (run / LOCK_FILE).symlink_to(victim)
    with pytest.raises(ForethoughtError, match=rf"cannot take the lock {run / LOCK_FILE}: it is a symbolic link"):
        with run_lock(run):
            pass
    assert main(["probe", "--checkpoints", "nothere", "--out", str(run)]) == 2
    assert victim.read_text() == "precious" and (run / LOCK_FILE).is_symlink() and len(list(run.iterdir())) == 1
    assert capsys.readouterr().err.count("\n") == 1  # one line
    (tmp_path / "kept").mkdir()
    note = "a note " * 1000  # longer than one read
    (tmp_path / "kept" / LOCK_FILE).write_text(note)
    with run_lock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept" / LOCK_FILE).read_text() == note  # a lock file that was there keeps its content
    staging = tmp_path / f".a.json.tmp-{os.getpid()}"  # an atomic write's (predictable) temporary, planted
    staging.symlink_to(victim)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert victim.read_text() == "precious" and read_json(tmp_path / "a.json") == {"x": 1} and not staging.exists()
    (tmp_path / "model").symlink_to(tmp_path / "kept")  # a staged folder replaces a link, not what it points to
    with staged_folder(tmp_path / "model") as folder:
        (folder / "new").write_text("new")
    assert (tmp_path / "model").is_dir() and not (tmp_path / "model").is_symlink()
    assert [p.name for p in (tmp_path / "kept").iterdir()] == [LOCK_FILE]
