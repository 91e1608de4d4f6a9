"""Attack every command line with bad values and every file a command reads back with damage, as issue 29's
second attack did, and count what comes back.

**Bad command lines.** Every flag of every command (read from ``analyses/cli.json``) gets the bad values of its
type — negative and overflowing integers, nan and infinities, empty strings, unknown names, missing paths, a file
where a folder belongs, empty and repeated list items, space-separated lists, malformed ``name=folder`` pairs,
a word after a switch — on top of a small command line that is valid by itself, plus an unknown flag per
command. Classes: ``one line`` (exit code 2, exactly one line ``forethought: error: …`` on stderr, nothing written
or changed), ``refused, but wrote``, ``traceback``, ``accepted`` (exit 0: read the list, some values may be
valid), ``ran on`` (still working at the time limit), ``other``.

**Injected faults.** Real tiny runs are built with the CLI (a trained checkpoint pair, a probe run, two gap runs,
their token files); each file a command reads back is damaged in a copy — 8 bytes flipped three quarters in, or
cut to half — and every command that reads that kind of folder is run on it (probe, train run again, compare,
seeds). Classes: ``detected`` (exit 2, the last line an error), ``no effect`` (exit 0 and the same tables, figures
and weights as on an undamaged copy: the file was not read, or was rebuilt), ``used silently`` (exit 0, another
outcome), ``traceback``. Then a lock or result file is made a symbolic link to a file outside: ``target kept``.

    python scripts/attack.py [--out attack.csv] [--only COMMAND] [--timeout 30]

Writes ``attack.csv`` (and ``attack-faults.csv``); prints the counts per class and every case outside the good
ones. Each case runs in a child forked from this process (libraries imported once): ~6 min on 2 cores. It is an
audit, not a test: ``tests/analyses/test_bad_input.py`` holds a row for each kind of case found and fixed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from forethought.analyses import cli

SPECS = json.loads(cli.SPEC_FILE.read_text())  # {command: {"description", "flags": [[flag, field, type, help]]}}
INT_BAD = ["-1", "99999999999999999999"]
FLOAT_BAD = ["nan", "-1e400"]
NAMED = {"--myopic-cut", "--precision", "--device", "--preset", "--layout", "--kind", "--model", "--tokenizer",
         "--objective", "--corpus-split", "--text-field"}  # flags that take one of a set of names
INPUTS = {"--vanilla-checkpoint", "--myopic-checkpoint", "--train-file", "--test-file", "--corpus", "--vanilla",
          "--myopic", "--mtp", "--run", "--command-line"}  # flags that name something that must exist
OUTPUTS = {"--out", "--figures-dir", "--folder", "--tokens-root"}  # folders written into
CORPUS = ["--corpus", "words.txt", "--seq-len", "16", "--tokens-root", "tok"]
PROBING = ["--max-sequences", "60", "--max-epochs", "1", "--precision", "float32"]
BASE = {  # a valid, quick command line per command; the attacked flag is appended (argparse keeps the last)
    "demo": ["--steps", "2", "--heldout-sequences", "16"],
    "synthetic": ["--preset", "cpu", "--steps", "2", "--heldout-sequences", "16"],
    "pathstar": ["--preset", "cpu", "--n-train", "200", "--n-test", "100", "--epochs", "0.1", "--eval-samples", "50",
                 "--probe-samples", "50", "--regimes", "teacher-forcing", "--n-layer", "1"],
    "pathstar-data": ["--n-train", "100", "--n-test", "50"],
    "train": ["--model", "gpt2-nano", "--tokenizer", "bpe:300", *CORPUS, "--steps", "2", "--batch-size", "4"],
    "probe": ["--checkpoints", "a=ck-a", *CORPUS, *PROBING],
    "precache": ["--vanilla", "ck-a", "--myopic", "ck-m", *CORPUS, *PROBING, "--no-random-init"],
    "intervene": ["--checkpoints", "a=ck-a", *CORPUS, "--max-sequences", "40", "--positions", "2", "--layers", "1",
                  "--taus", "1", "--ranks", "1"],
    "compare": ["--run", "run-probe"],
    "gap": ["--vanilla", "ck-a", "--myopic", "ck-m", *CORPUS, "--max-sequences", "40", "--share-sequences", "4"],
    "seeds": ["--runs", "run-gap-a,run-gap-b"],
    "trend": ["--runs", "run-gap-a,run-gap-b"],
    "figures": ["--dry-run"],
    "bench train": ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "16", "--batch-size", "2",
                    "--steps", "1", "--rounds", "1", "--warmup", "0"],
    "bench probe": ["--n-layer", "1", "--d-model", "16", "--n-sequences", "20", "--taus", "1", "--epochs", "1"],
    "bench cache": ["--model", "ck-a", *CORPUS, "--n-sequences", "8", "--rounds", "1"],
    "bench grid": ["--model", "ck-a", *CORPUS, "--max-sequences", "40", "--max-epochs", "1", "--taus", "1",
                   "--top-k", "100"],
    "bench paths": ["--model", "ck-a", *CORPUS, "--layers", "0,1", "--tau", "1", "--positions", "2",
                    "--n-sequences", "4", "--rounds", "1"],
    "bench pathstar": ["--n-train", "100"],
    "bench side-by-side": ["--command-line", "bench pathstar --n-train 100", "--rounds", "1"],
}
OUT_FLAG = {"bench cache": "--folder", "bench grid": "--folder", "bench probe": "--folder"}
FIXTURES = [  # built once, in order, by the CLI itself
    ["train", *BASE["train"], "--steps", "6", "--out", "ck-a"],
    ["train", *BASE["train"], "--steps", "6", "--myopic", "--out", "ck-m"],
    ["probe", *BASE["probe"], "--out", "run-probe"],
    ["gap", *BASE["gap"], "--out", "run-gap-a"],
    ["gap", *BASE["gap"], "--seed", "1", "--out", "run-gap-b"],
]


def bad_values(flag: str, kind: str) -> list[list[str]]:
    """The bad arguments for one flag of type ``kind`` (each a list: some cases are two words)."""
    if kind == "bool":
        return [[flag, "maybe"]]
    if kind == "int":
        return [[flag, v] for v in INT_BAD]
    if kind == "float":
        return [[flag, v] for v in FLOAT_BAD]
    if kind.startswith("tuple[int"):
        return [[flag, "1,,2"], [flag, "1,1"], [flag, "1", "2"], [flag, "-1"]]
    if kind.startswith("tuple[str"):
        return [[flag, "a,,b"], [flag, ""], [flag, "x,x"]]
    if kind.startswith("dict"):
        return [[flag, "a="], [flag, "=ck-a"], [flag, "a=ck-a,a=ck-m"], [flag, "a=missing"]]
    values = [[flag, ""]]
    if flag in NAMED:
        values.append([flag, "nope"])
    if flag in INPUTS:
        values.append([flag, "missing-thing"])
    if flag in OUTPUTS:
        values.append([flag, "words.txt"])
    return values


def cases() -> list[tuple[str, list[str]]]:
    """(command, argv) for every bad value of every flag, plus an unknown flag per command."""
    found = []
    for command, described in SPECS.items():
        for flag, _, kind, _ in described["flags"]:
            found += [(command, args) for args in bad_values(flag, kind)]
        found.append((command, ["--no-such-flag", "1"]))
    return found


def files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def classify(code: int | None, err: str, changed: bool) -> str:
    if "Traceback" in err:
        return "traceback"
    if code is None:
        return "ran on"
    if code == 0:
        return "accepted"
    if code == 2 and err.startswith("forethought: error: ") and err.count("\n") == 1:
        return "refused, but wrote" if changed else "one line"
    return "other"


def run_cli(work: Path, argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``forethought argv`` in ``work`` in a forked child of this process (the libraries are imported once,
    here: a case takes a fraction of a second), as the console script would: (exit code or None, stderr)."""
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: stdout dropped, stderr to the file
            os.chdir(work)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(err.fileno(), 2)
            try:
                code = cli.main(argv)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            code = None
        else:
            code = os.waitstatus_to_exitcode(done[1])
        err.seek(0)
        return code, err.read().decode(errors="replace")


def run_case(work: Path, command: str, argv: list[str], timeout: float) -> tuple[str, str, float, list[str]]:
    """Run one case on top of its command's valid line; (class, last line of stderr, seconds, files written)."""
    out_flag = OUT_FLAG.get(command, "--out")
    flags = {described[0] for described in SPECS[command]["flags"]}
    extra = [out_flag, "case-out"] if out_flag in flags and out_flag not in argv else []
    before = files(work)
    started = time.perf_counter()
    code, err = run_cli(work, [*command.split(), *BASE[command], *extra, *argv], timeout)
    seconds = time.perf_counter() - started
    after = files(work)
    changed = sorted(name for name in after if after[name] != before.get(name))
    for name in changed:  # leave the next case the folder as it was (a changed fixture file is reported)
        if name not in before:
            (work / name).unlink()
    for folder in sorted((p for p in work.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()) and str(folder.relative_to(work)) not in before:
            folder.rmdir()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return classify(code, err, bool(changed)), last, seconds, changed


def build_fixtures(work: Path) -> None:
    (work / "words.txt").write_text("\n\n".join(" ".join(f"w{(i * 7 + j * j) % 997}" for j in range(40))
                                                for i in range(300)))
    for line in FIXTURES:
        code, err = run_cli(work, line, timeout=600)
        if code != 0:
            raise SystemExit(f"fixture {' '.join(line)} failed:\n{err[-2000:]}")


CONSUMERS = {  # fixture → the command lines that read it back, its copy named COPY
    "ck-a": [["probe", *BASE["probe"], "--checkpoints", "a=COPY", "--out", "case-out"],
             [*FIXTURES[0][:-1], "COPY"]],  # read, and its training command run again (resume)
    "run-probe": [[*FIXTURES[2][:-1], "COPY"], ["compare", "--run", "COPY", "--figures-dir", "case-out"],
                  ["seeds", "--runs", "COPY,run-probe", "--out", "case-out"]],
    "run-gap-a": [["seeds", "--runs", "COPY,run-gap-b", "--out", "case-out"]],
    "tok": [["probe", *BASE["probe"], "--tokens-root", "COPY", "--out", "case-out"]],
}
SKIPPED = ("figures/", ".forethought.lock", "results.csv", "histories.json")  # for people, not read back


def damages(path: Path) -> dict[str, bytes]:
    """{how: damaged bytes} of one file: 8 bytes flipped three quarters in, and cut to half its length."""
    data = bytearray(path.read_bytes())
    at = min(len(data) * 3 // 4, max(len(data) - 8, 0))
    flipped = data[:at] + bytes(b ^ 0xFF for b in data[at:at + 8]) + data[at + 8:]
    return {"8 bytes flipped": bytes(flipped), "cut to half": bytes(data[: len(data) // 2])}


def faults(work: Path) -> list[tuple[str, str, list[str], Path, bytes]]:
    """(fixture, damage, command line, file, its damaged bytes) for every file a command reads back."""
    found = []
    for fixture, lines in CONSUMERS.items():
        for file in sorted(p for p in (work / fixture).rglob("*") if p.is_file()):
            name = str(file.relative_to(work / fixture))
            if any(skip in name for skip in SKIPPED):
                continue
            for how, damaged in damages(file).items():
                found += [(fixture, f"{name}: {how}", line, file, damaged) for line in lines]
    return found


def outcome_of(work: Path) -> str:
    """What a reading command produced, comparable between runs: its result tables, its figures (plotly's random
    element ids blanked) and the newest weights of a training run, hashed."""
    made = sorted([*work.glob("case-out/*.csv"), *work.glob("case-out/*.html"), *work.glob("COPY/results.csv"),
                   *sorted(work.glob("COPY/checkpoints/step-*/model.safetensors"))[-1:]])
    digest = hashlib.sha256()
    for path in made:
        data = path.read_bytes()
        digest.update(re.sub(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", b"id", data)
                      if path.suffix == ".html" else data)
    return digest.hexdigest()


def run_fault(work: Path, fixture: str, line: list[str], timeout: float, damage: tuple[Path, bytes] | None = None
              ) -> tuple[int | None, str, str]:
    """Run ``line`` on a copy of ``fixture`` (with ``damage``: that file's bytes replaced): (exit code, stderr,
    :func:`outcome_of` the run)."""
    copy = work / "COPY"
    shutil.copytree(work / fixture, copy, symlinks=True)
    if damage is not None:
        (copy / damage[0].relative_to(work / fixture)).write_bytes(damage[1])
    code, err = run_cli(work, line, timeout)
    outcome = outcome_of(work)
    shutil.rmtree(copy)
    shutil.rmtree(work / "case-out", ignore_errors=True)
    return code, err, outcome


def fault_class(code: int | None, err: str, outcome: str, clean: str) -> str:
    """``detected`` (exit 2, the last line an error naming it), ``no effect`` (exit 0, the same outcome as on the
    undamaged copy: the file was not read, or was rebuilt), ``used silently`` (exit 0, another outcome), …"""
    if "Traceback" in err:
        return "traceback"
    if code == 2 and err.strip().splitlines()[-1].startswith("forethought: error: "):
        return "detected"
    if code == 0:
        return "no effect" if outcome == clean else "used silently"
    return "ran on" if code is None else "other"


def symlink_attacks(work: Path, timeout: float) -> list[dict[str, str]]:
    """A run's lock or result file made a symbolic link to a file outside: the target must stay as it was."""
    rows = []
    for fixture, line, link in (("run-probe", ["probe", *BASE["probe"], "--out", "COPY"], ".forethought.lock"),
                                ("run-gap-a", ["gap", *BASE["gap"], "--out", "COPY"], "results.parquet"),
                                ("ck-a", CONSUMERS["ck-a"][1], ".forethought.lock")):
        victim = work / "victim.txt"
        victim.write_text("precious\n")
        shutil.copytree(work / fixture, work / "COPY", symlinks=True)
        (work / "COPY" / link).unlink(missing_ok=True)
        (work / "COPY" / link).symlink_to(victim)
        code, err = run_cli(work, line, timeout)
        kept = victim.read_text() == "precious\n"
        shutil.rmtree(work / "COPY")
        victim.unlink()
        rows.append({"fixture": fixture, "fault": f"{link} → a file outside", "command": " ".join(line[:2]),
                     "class": ("target kept" if kept else "target overwritten") + f", exit {code}",
                     "last_line": err.strip().splitlines()[-1] if err.strip() else ""})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="attack.csv", help="the cases and their classes, as CSV")
    parser.add_argument("--only", default=None, help="the bad command lines of this command only (no injected faults)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as 'ran on'")
    args = parser.parse_args()
    found = [(c, a) for c, a in cases() if args.only in (None, c)]
    os.environ["FORETHOUGHT_PNG"] = "0"  # no Chromium per figure
    for command in cli.COMMANDS.values():  # every command's modules imported here, once, before the forks
        command.config_class(), command.run_function()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        build_fixtures(work)
        rows = []
        for command, argv in found:
            outcome, last, seconds, written = run_case(work, command, argv, args.timeout)
            rows.append({"command": command, "argv": " ".join(repr(a) if not a or " " in a else a for a in argv),
                         "class": outcome, "seconds": round(seconds, 1), "last_line": last,
                         "written": " ".join(written[:3])})
        damaged = []
        if args.only is None:
            clean = {}
            for fixture, lines in CONSUMERS.items():  # each reader runs on an undamaged copy first
                for line in lines:
                    code, err, clean[fixture, tuple(line)] = run_fault(work, fixture, line, args.timeout)
                    if code != 0:
                        raise SystemExit(f"{' '.join(line)} fails on an undamaged copy:\n{err[-2000:]}")
            for fixture, fault, line, file, data in faults(work):
                code, err, outcome = run_fault(work, fixture, line, args.timeout, (file, data))
                damaged.append({"fixture": fixture, "fault": fault, "command": " ".join(line[:2]),
                                "class": fault_class(code, err, outcome, clean[fixture, tuple(line)]),
                                "last_line": err.strip().splitlines()[-1] if err.strip() else ""})
            damaged += symlink_attacks(work, args.timeout)
    write_csv(args.out, rows)
    report(rows, "bad command lines", "one line", lambda r: f"{r['command']} {r['argv']}")
    if damaged:
        write_csv(Path(args.out).with_name(Path(args.out).stem + "-faults.csv"), damaged)
        report(damaged, "injected faults", "detected", lambda r: f"{r['command']} on {r['fixture']}/{r['fault']}",
               also_good=("no effect", "target kept"))


def write_csv(path: str | Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def report(rows: list[dict[str, str]], what: str, good: str, name: Callable[[dict[str, str]], str],
           also_good: tuple[str, ...] = ()) -> None:
    """Counts per class, then every case not in the ``good`` class (nor starting with one of ``also_good``)."""
    classes = sorted({r["class"] for r in rows})
    print(f"{len(rows)} {what}:", ", ".join(f"{sum(r['class'] == c for r in rows)} {c}" for c in classes))
    for row in rows:
        if row["class"] != good and not row["class"].startswith(also_good):
            print(f"  [{row['class']}] {name(row)}: {row['last_line'][:160]}")


if __name__ == "__main__":
    main()
