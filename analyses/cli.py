"""forethought: do language models plan ahead? Each subcommand is a dataclass config: every field is a --flag.

``forethought --help`` lists the commands; docs/cli.md's reference is this parser's own help text
(:func:`cli_reference`, written there by ``python scripts/cli_reference.py``; a test fails when it is stale).
The parser is built from ``cli.json`` (the flags of every command, written by the same script from the config
dataclasses; a test fails when it is stale), so ``--help`` and a bad flag are answered before torch, transformers
or any experiment is imported; a command's modules load only once its flags have parsed.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from tqdm.auto import tqdm

from forethought.analyses.flags import FlagSpec, add_flags, flag_specs
from forethought.core.errors import ForethoughtError, as_flags, one_line
from forethought.core.files import atomic_write_json, read_json
from forethought.core.settings import build_config, check_settings, flat_defaults
from forethought.core.threads import claim_threads, using_threads

FIGURES_FILE = Path(__file__).with_name("figures.txt")  # every command that writes figures/, as data


def figure_commands() -> list[str]:
    """The commands of :data:`FIGURES_FILE`, in order (comments and blank lines left out)."""
    lines = (line.split("#", 1)[0].strip() for line in FIGURES_FILE.read_text().splitlines())
    return [line for line in lines if line]


FIGURES = figure_commands()


@dataclass
class FiguresConfig:
    """Settings of ``forethought figures``: run, in order, every command that writes figures/."""

    dry_run: bool = False  # print the commands without running them
    log: str = "runs/figures.json"  # commands finished, with wall times: a rerun skips each while its --out is there
    redo: bool = False  # run every command again, finished or not


def run_figures(config: FiguresConfig) -> None:
    """Run each line of :data:`FIGURES` (analyses/figures.txt), or only print it; stop at the first that fails.
    A line finished before (in ``config.log``, its ``--out`` still there) is skipped, so a rerun resumes."""
    check_settings(config)
    log = Path(config.log)
    if log.is_dir() or (log.parent.exists() and not log.parent.is_dir()):
        raise ForethoughtError(f"log {log} cannot be written (a folder, or in a file's place); give the file "
                               "that records finished commands")
    finished = read_json(log, "remove it to run every command again") if log.exists() and not config.redo else {}
    if not all(isinstance(done, dict) and isinstance(done.get("wall_s"), (int, float)) for done in finished.values()):
        raise ForethoughtError(f"{log} is damaged (an entry without its wall time); remove it to run every command "
                               "again")
    for line in FIGURES:
        out = _flag_value(line, "--out")
        if line in finished and (out is None or Path(out).exists()):
            print(f"forethought {line}  # done earlier, {_wall(finished[line]['wall_s'])}", flush=True)
            continue
        print(f"forethought {line}", flush=True)
        if config.dry_run:
            continue
        start = time.perf_counter()
        if (status := main(line.split())) != 0:
            raise ForethoughtError(f"stopped: `forethought {line}` failed (exit {status})")
        finished[line] = {"wall_s": round(time.perf_counter() - start, 1)}  # threads: in the run's own meta.json
        atomic_write_json(log, finished)
        print(f"  # {_wall(finished[line]['wall_s'])}", flush=True)


def _flag_value(line: str, flag: str) -> str | None:
    """The value given to ``flag`` in a command ``line`` (None when it is not given)."""
    words = line.split()
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def _wall(seconds: float) -> str:
    """A wall time readably: ``"wall 42 s"``, ``"wall 12 min 5 s"``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"wall {minutes} min {rest} s" if minutes else f"wall {rest} s"


Report = Callable[[str, Any, Any], str]  # (command, config, what its run returned) → what is printed


def _experiment(name: str, config: Any, results: Any) -> str:
    return f"{results.summary()}\nresults, figures and checkpoints in {config.out}"


def _analysis(name: str, config: Any, results: Any) -> str:
    return f"{results.summary()}\nresults and figures in {config.out}"


def _trained(name: str, config: Any, result: Any) -> str:
    """The last losses and the checkpoint (one report under torchrun)."""
    if not result.history or int(os.environ.get("RANK", "0")) != 0:
        return ""
    return f"step {result.history[-1]['step']}: {_losses(result.history)}\ncheckpoint: {result.checkpoint}"


def _compared(name: str, config: Any, comparison: Any) -> str:
    return f"{comparison!r}\nfigure in {config.figures_dir}"


def _benched(name: str, config: Any, table: Any) -> str:
    measured = table.dropna(axis=1, how="all")  # memory columns are CUDA-only
    return (f"forethought {name} — {table.attrs['setting']}\n"
            + measured.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _as_returned(name: str, config: Any, text: str | None) -> str:
    return text or ""


@dataclass(frozen=True)
class Command:
    """One subcommand: where its settings dataclass (every field a --flag) and its run function live, as
    ``module:name`` (imported only when it runs, or when ``cli.json`` is rewritten), and what it prints."""

    config: str
    run: str
    help: str
    report: Report
    presets: tuple[str, ...] = ()  # the config's PRESETS whose values the help lists
    preset: str | None = None  # the one used when --preset is not given (None: the dataclass's own defaults)
    choose_preset: bool = True  # False: --preset is not a flag (demo is always cpu)
    aliases: tuple[str, ...] = ()
    description: str | None = None  # default: the config's docstring

    def config_class(self) -> type:
        return _imported(self.config)

    def run_function(self) -> Callable[[Any], Any]:
        return _imported(self.run)

    def preset_values(self) -> dict[str, dict[str, Any]] | None:
        """{preset: its values} for the help ("no preset" first where none is the default); None without presets."""
        if not self.presets:
            return None
        table = self.config_class().PRESETS
        return {**({"no preset": {}} if self.preset is None else {}), **{name: table[name] for name in self.presets}}


def _imported(where: str) -> Any:
    """``module:name`` → that object (importing the module)."""
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


SYNTHETIC, PATHSTAR = "forethought.analyses.synthetic", "forethought.analyses.pathstar"
ACROSS, BENCH = "forethought.analyses.across", "forethought.analyses.bench"
GROUPS = {"bench": "speed and memory, as ratios measured in one run"}  # commands of two words: `bench train`
COMMANDS: dict[str, Command] = {  # the command line, one row per command
    "demo": Command(f"{SYNTHETIC}:SyntheticConfig", f"{SYNTHETIC}:run_synthetic",
                    "run the embedded default: the synthetic experiment, cpu preset", _experiment, ("cpu",), "cpu",
                    choose_preset=False,
                    description="The embedded default: forethought synthetic with the cpu preset — a vanilla and a "
                                "myopic twin trained on the synthetic pre-caching task (Wu et al. §2), probed layer "
                                "by layer beside a random-init control and tested causally, in 5–7 minutes on 2 CPU "
                                "cores; any setting of forethought synthetic may be given."),
    "synthetic": Command(f"{SYNTHETIC}:SyntheticConfig", f"{SYNTHETIC}:run_synthetic",
                         "vanilla vs myopic twins on the synthetic pre-caching task, probed layer by layer",
                         _experiment, ("paper", "cpu"), "cpu"),
    "pathstar": Command(f"{PATHSTAR}:PathStarConfig", f"{PATHSTAR}:run_pathstar",
                        "path-star graphs: each regime × (vanilla, myopic), accuracy and planning probes",
                        _experiment, ("paper", "cpu"), "cpu"),
    "pathstar-data": Command(f"{PATHSTAR}:PathStarDataConfig", f"{PATHSTAR}:run_pathstar_data",
                             "write disjoint train/test files of G(d, l, N)", _as_returned),
    "train": Command("forethought.models.lm:LMTrainConfig", "forethought.models.lm:train_lm",
                     "train a language model on text, vanilla or --myopic", _trained, ("cpu",)),
    "probe": Command("forethought.analyses.probe:ProbeConfig", "forethought.analyses.probe:run_probe",
                     "future-token probes for every (layer, τ) of checkpoints", _analysis),
    "precache": Command("forethought.analyses.precache:PrecacheConfig", "forethought.analyses.precache:run_precache",
                        "pre-caching vs breadcrumbs for a vanilla/myopic twin pair", _analysis),
    "intervene": Command("forethought.analyses.intervene:InterveneConfig",
                         "forethought.analyses.intervene:run_intervene",
                         "causal tests: erase x[t+τ] from h[l, t], read the loss on the own and future paths",
                         _analysis),
    "compare": Command("forethought.analyses.compare:CompareConfig", "forethought.analyses.compare:run_compare",
                       "the interactive comparison figure of a probe or precache run", _compared),
    "gap": Command("forethought.analyses.gap:GapConfig", "forethought.analyses.gap:run_gap",
                   "myopia gap of twins and future-gradient share per layer", _analysis),
    "seeds": Command(f"{ACROSS}:AcrossConfig", f"{ACROSS}:run_seeds",
                     "spread between runs (training seeds) of gap / precache / probe results", _analysis),
    "trend": Command(f"{ACROSS}:AcrossConfig", f"{ACROSS}:run_trend", "myopia gap of gap runs against model size",
                     _analysis),
    "figures": Command("forethought.analyses.cli:FiguresConfig", "forethought.analyses.cli:run_figures",
                       "regenerate every figure in figures/ from the embedded default", _as_returned,
                       description=f"Runs, in order, the {len(FIGURES)} commands of analyses/figures.txt (--dry-run "
                                   "prints them), which write every figure in figures/, and prints each one's wall "
                                   "time. Each finished command is recorded in --log; a rerun skips those whose "
                                   "--out is still there, and an interrupted training or causal run resumes."),
    "bench train": Command(f"{BENCH}:TrainBenchConfig", f"{BENCH}:bench_train",
                           "training step: tokens/s and memory, myopic (fast, naive) ÷ vanilla", _benched,
                           aliases=("myopic",)),  # `bench myopic`: its old name
    "bench probe": Command(f"{BENCH}:ProbeBenchConfig", f"{BENCH}:bench_probe",
                           "caching and probe fitting: throughput, and torch ÷ sklearn time", _benched),
    "bench cache": Command(f"{BENCH}:CacheBenchConfig", f"{BENCH}:bench_cache",
                           "residual caching (and the bridge) ÷ a bare Hugging Face forward pass", _benched),
    "bench grid": Command(f"{BENCH}:GridBenchConfig", f"{BENCH}:bench_grid",
                          "the probing grid end to end, each step ÷ a bare forward pass", _benched),
    "bench paths": Command(f"{BENCH}:PathsBenchConfig", f"{BENCH}:bench_paths",
                           "the causal test's edited runs: cached and replayed ÷ whole prefixes", _benched),
    "bench pathstar": Command(f"{BENCH}:PathStarBenchConfig", f"{BENCH}:bench_pathstar",
                              "path-star text files: generate, write, parse, vectorised ÷ line by line", _benched),
    "bench side-by-side": Command(f"{BENCH}:SideBySideBenchConfig", f"{BENCH}:bench_side_by_side",
                                  "two runs started together ÷ one after the other (the threads rule)", _benched),
}
EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {  # (command line, what it does): the end of each help
    "demo": (
        ("forethought demo",
         "the embedded default: train both twins, probe and test them causally (5–7 min on 2 cores)"),
        ("forethought demo --seed 1 --out runs/demo-s1",
         "another training seed, for the spread between seeds (forethought seeds)"),
    ),
    "synthetic": (
        ("forethought synthetic --preset paper --out runs/synthetic",
         "the paper's setting: 20,000 steps of 512 sequences per twin (a GPU)"),
        ("forethought synthetic --vanilla-checkpoint runs/demo/vanilla/checkpoints/step-0003000 --myopic-checkpoint "
         "runs/demo/myopic/checkpoints/step-0003000 --out runs/synthetic-read",
         "probe and erase in trained twins again, without training (20 s)"),
    ),
    "pathstar": (
        ("forethought pathstar --seed 1 --out runs/pathstar-cpu-s1",
         "cpu preset, G(2, 4, 20): three regimes × (vanilla, myopic), about 20 min on 2 cores"),
        ("forethought pathstar --prefix-loss --regimes teacher-forcing --out runs/pathstar-prefix",
         "both twins also learn to predict the edge list; one regime"),
    ),
    "pathstar-data": (
        ("forethought pathstar-data --out data",
         "the paper's G(5, 5, 50): 200,000 training and 20,000 test graphs"),
        ("forethought pathstar-data --degree 2 --length 4 --n-nodes 20 --n-train 50000 --n-test 2000 --out data-cpu",
         "the cpu preset's graph family"),
    ),
    "train": (
        ("forethought train --preset cpu --out runs/lm-cpu-vanilla",
         "a small model on the embedded corpus (about 13 min on 2 cores)"),
        ("forethought train --preset cpu --myopic --out runs/lm-cpu-myopic",
         "its myopic twin: same data, seed and settings"),
        ("forethought train --model smollm2-135m --from-pretrained --tokenizer smollm2-135m --steps 300 --myopic "
         "--out runs/ft-smollm2-myopic",
         "fine-tune the pretrained SmolLM2-135M myopically"),
    ),
    "probe": (
        ("forethought probe --checkpoints smollm2-135m",
         "the pretrained SmolLM2-135M (offline) on the embedded corpus, every layer, τ = 1 … 4"),
        ("forethought probe --checkpoints vanilla=runs/lm-cpu-vanilla,myopic=runs/lm-cpu-myopic --taus 1,2 --out "
         "runs/probe-cpu",
         "two trained models side by side, τ = 1 and 2"),
    ),
    "precache": (
        ("forethought precache --vanilla runs/lm-cpu-vanilla --myopic runs/lm-cpu-myopic --out runs/precache-cpu",
         "P(l, τ) of twins, and P at equal next-token loss"),
        ("forethought precache --vanilla runs/lm-cpu-vanilla --myopic runs/lm-cpu-myopic --precision bfloat16 "
         "--max-sequences 1000 --max-epochs 4 --out runs/precache-cpu-fast",
         "the README's faster run (15–20 min on 2 cores)"),
    ),
    "intervene": (
        ("forethought intervene --checkpoints vanilla=runs/lm-cpu-vanilla,myopic=runs/lm-cpu-myopic --max-sequences "
         "400 --positions 4 --out runs/intervene-cpu",
         "erase x[t+τ] from every layer of the twins; loss on the own and future paths"),
        ("forethought intervene --checkpoints smollm2=smollm2-135m --layers 0,15,30 --taus 1,2 --ranks 1,16 --out "
         "runs/intervene-smollm2",
         "three layers of the pretrained SmolLM2-135M"),
    ),
    "compare": (
        ("forethought compare --run runs/probe-cpu",
         "the interactive figure of a probe run (menus: probe, metric, τ)"),
        ("forethought compare --run runs/precache-cpu --figures-dir figures",
         "the same for a precache run, copied into figures/"),
    ),
    "gap": (
        ("forethought gap --vanilla runs/lm-cpu-vanilla --myopic runs/lm-cpu-myopic --out runs/gap-cpu",
         "the myopia gap of twins, by position, and the future-gradient share"),
        ("forethought gap --vanilla smollm2-135m --corpus embedded --layout packed --max-sequences 256 --out "
         "runs/gap-smollm2",
         "the future-gradient share of a pretrained model alone"),
    ),
    "seeds": (
        ("forethought seeds --runs runs/demo-s0,runs/demo-s1,runs/demo-s2 --out runs/seeds-demo",
         "the spread of the demo's numbers over three training seeds"),
        ("forethought seeds --runs runs/gap-cpu-s0,runs/gap-cpu-s1,runs/gap-cpu-s2 --labels s0,s1,s2 --out "
         "runs/seeds-gap",
         "the myopia gap over seeds, labelled"),
    ),
    "trend": (
        ("forethought trend --runs runs/gap-nano-s0,runs/gap-nano-s1,runs/gap-cpu-s0,runs/gap-cpu-s1 --out runs/trend",
         "the gap against model size, seeds of each size pooled"),
        ("forethought trend --runs runs/precache-nano-s0,runs/precache-cpu-s0 --tau 2 --loss-matched "
         "--out runs/trend-precache", "P at τ = 2 at equal next-token loss (P_matched) against model size"),
    ),
    "figures": (
        ("forethought figures --dry-run",
         "list the commands that make figures/, in order"),
        ("forethought figures",
         "run them (hours on 2 cores; a rerun resumes where it stopped)"),
    ),
    "bench train": (
        ("forethought bench train",
         "tokens/s of a myopic step (fast and naive) ÷ a vanilla step, GPT-2 at CPU size"),
        ("forethought bench train --model llama --steps 5",
         "the same for the Llama family"),
    ),
    "bench probe": (
        ("forethought bench probe",
         "caching and probe-fitting throughput, and the time of sklearn ÷ this package's fitter"),
        ("forethought bench probe --taus 1,2 --classes 100",
         "fewer offsets, more classes"),
    ),
    "bench cache": (
        ("forethought bench cache",
         "residual caching of SmolLM2-135M ÷ a bare Hugging Face forward pass"),
        ("forethought bench cache --model runs/lm-cpu-vanilla --n-sequences 128",
         "the same for a trained run"),
    ),
    "bench grid": (
        ("forethought bench grid",
         "each step of the probing grid on SmolLM2-135M ÷ a bare forward pass"),
        ("forethought bench grid --model runs/lm-cpu-vanilla --taus 1,2",
         "the grid of a trained run"),
    ),
    "bench paths": (
        ("forethought bench paths",
         "the causal test's edited runs on SmolLM2-135M at layers 0, 15, 30: cached and replayed ÷ whole prefixes"),
        ("forethought bench paths --model runs/lm-cpu-s0-vanilla --layers 0,2,4 --n-sequences 64",
         "the same for a trained run"),
    ),
    "bench pathstar": (
        ("forethought bench pathstar",
         "generate, write and parse G(5, 5, 50) files: vectorised ÷ line by line"),
        ("forethought bench pathstar --n-train 20000",
         "a smaller file"),
    ),
    "bench side-by-side": (
        ("forethought bench side-by-side",
         "two bench train runs started together ÷ one after the other"),
        ("forethought bench side-by-side --command-line 'bench probe --taus 1' --rounds 2",
         "another command, two rounds"),
    ),
}
THREADS_HELP = ("CPU threads (default: the cores no other forethought run holds, shared evenly with runs started "
                "together; recorded with the results: docs/performance.md)")
SPEC_FILE = Path(__file__).with_name("cli.json")  # {command: {"description", "flags"}}: what the parser is built from


def command_specs() -> dict[str, dict[str, Any]]:
    """{command: {"description": …, "flags": [FlagSpec, …]}} from the config dataclasses themselves (imports every
    experiment): what ``cli.json`` holds."""
    specs = {}
    for name, command in COMMANDS.items():
        config = command.config_class()
        flags = flag_specs(config, skip=() if command.choose_preset else ("preset",), presets=command.preset_values())
        specs[name] = {"description": command.description or help_description(config.__doc__,
                                                                              {flag.dest for flag in flags}),
                       "flags": flags}
    return specs


def _saved_specs() -> dict[str, dict[str, Any]]:
    """What ``cli.json`` holds; a missing or stale one is the maintainer's to rewrite."""
    try:
        specs = json.loads(SPEC_FILE.read_text())
    except (OSError, ValueError) as error:
        raise ForethoughtError(f"cannot read {SPEC_FILE} ({error}): run python scripts/cli_reference.py") from None
    if set(specs) != set(COMMANDS):
        raise ForethoughtError(f"{SPEC_FILE} is stale: run python scripts/cli_reference.py")
    return specs


def help_description(docstring: str, settings: set[str]) -> str:
    """A config's docstring as its command's description: its ``settings`` named as flags, without
    reStructuredText's backticks, and without the paragraphs written for Python users (those starting "In
    Python")."""
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(as_flags(text.replace("``", "`"), settings).replace("`", "")
                         for text in paragraphs if not text.startswith("In Python"))


def examples_text(name: str) -> str:
    """The last paragraph of a command's help: its :data:`EXAMPLES`, each line as written."""
    return "examples:\n" + "\n".join(f"  {line}\n      {what}" for line, what in EXAMPLES[name])


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, keeping paragraphs apart and the examples' lines as written (to copy)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        fill = super()._fill_text
        return "\n\n".join(fill(part, width, indent) for part in text.split("\n\n"))


class _OneLineErrors(argparse.ArgumentParser):
    """A parser whose errors (an unknown flag, a value that is not a number) are :class:`ForethoughtError`: one
    line naming the problem and exit code 2, like every other bad input. Subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("forethought").strip()  # "probe", "bench train"; "" for the top level
        stray = message.removeprefix("unrecognized arguments: ").split() if "unrecognized arguments" in message else []
        if stray and not any(word.startswith("-") for word in stray):  # --taus 1 2: a list written with spaces
            message += " (lists take commas, not spaces: e.g. --taus 1,2)"
        raise ForethoughtError(f"{command}: {message}" if command else message)


def build_parser(specs: dict[str, dict[str, Any]] | None = None) -> argparse.ArgumentParser:
    """One subparser per row of :data:`COMMANDS` (``bench train``: ``train`` under ``bench``), its flags from
    ``specs`` (default: ``cli.json``; :func:`command_specs` builds the same from the config classes)."""
    specs = _saved_specs() if specs is None else specs
    parser = _OneLineErrors(prog="forethought", description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        group, _, member = name.partition(" ")
        if member and group not in groups:
            groups[group] = commands.add_parser(group, help=GROUPS[group]).add_subparsers(
                dest=group, required=True, metavar=group.upper())
        subparser = (groups[group] if member else commands).add_parser(
            member or name, aliases=command.aliases, help=command.help, description=specs[name]["description"],
            epilog=examples_text(name), formatter_class=_HelpFormatter)
        add_flags(subparser, [FlagSpec(*flag) for flag in specs[name]["flags"]])
        subparser.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="INT", help=THREADS_HELP)
    return parser


class _ProgressSafeHandler(logging.Handler):
    """Log records as plain lines on the current stderr, written around any progress bar (settings named as flags)."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(as_flags(self.format(record), _COMMAND_SETTINGS), file=sys.stderr)


_COMMAND_SETTINGS: set[str] = set()  # the running command's settings: messages name them as its flags


def show_library_logs() -> None:
    """The workbench's own log records (the ``forethought`` loggers; INFO and up) on stderr."""
    logger = logging.getLogger("forethought")
    if not logger.handlers:
        logger.addHandler(_ProgressSafeHandler())
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    show_library_logs()
    config = None
    try:
        args = vars(build_parser().parse_args(argv))
        name = args.pop("command")
        if name in GROUPS:
            member = args.pop(name)
            name = next(key for key, row in COMMANDS.items() if key == f"{name} {member}" or member in row.aliases)
        command, threads = COMMANDS[name], args.pop("threads", None)
        config_class = command.config_class()  # the flags parsed: now the command's modules load
        _COMMAND_SETTINGS.update({*flat_defaults(config_class), "threads"})
        preset = args.pop("preset", command.preset)
        config = config_class.from_preset(preset, **args) if preset is not None else build_config(config_class, args)
        from forethought.models.gpt2 import quiet_loading  # loads transformers: not before the flags parsed

        with quiet_loading(), using_threads(claim_threads(threads)):
            result = command.run_function()(config)
        if report := command.report(name, config, result):
            print(report)
    except ForethoughtError as error:
        print(f"forethought: error: {as_flags(one_line(error, limit=10_000), _COMMAND_SETTINGS)}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk or the file system refused (full, read-only, permissions, a size limit)
        print(f"forethought: error: {_refused(error, getattr(config, 'out', None))}", file=sys.stderr)
        return 2
    except MemoryError as error:  # settings asking for more memory than there is
        print(f"forethought: error: not enough memory for these settings ({one_line(error, 200) or 'MemoryError'}); "
              "choose smaller ones", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forethought: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _refused(error: OSError, out: str | None) -> str:
    """What the file system refused, naming the file (or, when the error does not, the run folder written)."""
    if isinstance(error, FileExistsError) and error.filename:
        return f"{error.filename} already exists where this command needs to make a folder or file: move it away"
    reason = error.strerror or str(error)
    if error.errno == errno.EFBIG:
        reason = "a file reached the largest size this process may write (the file-size limit, ulimit -f)"
    if error.filename:
        return f"{reason}: {error.filename}"
    return f"{reason} (while writing under {out})" if out else reason


def cli_reference(specs: dict[str, dict[str, Any]] | None = None) -> str:
    """The help of the command and of every subcommand, as Markdown (collapsed blocks), 100 columns wide (flags
    from ``specs``, default ``cli.json``)."""
    parser = build_parser(specs)
    blocks = [f"```\n{_help_text(parser)}```"]
    for name, subparser in _subcommands(parser):
        blocks.append(f"<details><summary><code>forethought {name}</code></summary>\n\n"
                      f"```\n{_help_text(subparser)}```\n</details>")
    return "\n\n".join(blocks)


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every subcommand, nested ones (``bench train``) included, aliases once."""
    found, seen = [], set()
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, subparser in action.choices.items():
            if id(subparser) not in seen:
                seen.add(id(subparser))
                found.append((prefix + name, subparser))
                found += _subcommands(subparser, prefix + name + " ")
    return found


def _help_text(parser: argparse.ArgumentParser) -> str:
    """``parser``'s help at a fixed width, whatever the terminal."""
    formatter_class = parser.formatter_class
    parser.formatter_class = functools.partial(formatter_class, width=100)
    try:
        return parser.format_help()
    finally:
        parser.formatter_class = formatter_class


def _losses(history: list[dict[str, float]]) -> str:
    """The last training loss and the last held-out loss of a run."""
    held_out = [record["eval_loss"] for record in history if "eval_loss" in record]
    text = f"train loss {history[-1]['train_loss']:.4f}"
    return text + (f", validation loss {held_out[-1]:.4f}" if held_out else "")
