"""forethought: do language models plan ahead? Each subcommand is a dataclass config: every field is a --flag.

``forethought --help`` lists the commands; docs/cli.md's reference is this parser's own help text
(:func:`cli_reference`, written there by ``python scripts/cli_reference.py``; a test fails when it is stale).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from tqdm.auto import tqdm

from forethought.analyses.across import AcrossConfig, run_seeds, run_trend
from forethought.analyses.bench import (
    CacheBenchConfig,
    PathStarBenchConfig,
    ProbeBenchConfig,
    TrainBenchConfig,
    bench_cache,
    bench_pathstar,
    bench_probe,
    bench_train,
)
from forethought.analyses.compare import CompareConfig, run_compare
from forethought.analyses.gap import GapConfig, run_gap
from forethought.analyses.pathstar import PathStarConfig, PathStarDataConfig, run_pathstar, run_pathstar_data
from forethought.analyses.precache import PrecacheConfig, run_precache
from forethought.analyses.probe import ProbeConfig, run_probe
from forethought.analyses.synthetic import SyntheticConfig, run_synthetic
from forethought.core.errors import ForethoughtError, one_line
from forethought.core.settings import (
    LIST_KINDS,
    as_text,
    build_config,
    field_default,
    from_text,
    list_kinds,
    nested_settings,
)
from forethought.models.gpt2 import quiet_loading
from forethought.models.lm import LM_TRAIN_PRESETS, LMTrainConfig, train_lm

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


def run_figures(config: FiguresConfig) -> None:
    """Run each line of :data:`FIGURES` (analyses/figures.txt), or only print it; stop at the first that fails."""
    for line in FIGURES:
        print(f"forethought {line}", flush=True)
        if not config.dry_run and (status := main(line.split())) != 0:
            raise ForethoughtError(f"stopped: `forethought {line}` failed (exit {status})")


Report = Callable[[str, Any, Any], str]  # (command, config, what its run returned) → what is printed


def _experiment(name: str, config: Any, results: Any) -> str:
    return f"{results.summary()}\nresults, figures and checkpoints in {config.out}"


def _analysis(name: str, config: Any, results: Any) -> str:
    return f"{results.summary()}\nresults and figures in {config.out}"


def _trained(name: str, config: LMTrainConfig, result: Any) -> str:
    """The last losses and the checkpoint (one report under torchrun)."""
    if not result.history or int(os.environ.get("RANK", "0")) != 0:
        return ""
    return f"step {result.history[-1]['step']}: {_losses(result.history)}\ncheckpoint: {result.checkpoint}"


def _compared(name: str, config: CompareConfig, comparison: Any) -> str:
    return f"{comparison!r}\nfigure in {config.figures_dir}"


def _benched(name: str, config: Any, table: Any) -> str:
    measured = table.dropna(axis=1, how="all")  # memory columns are CUDA-only
    return (f"forethought {name} — {table.attrs['setting']}\n"
            + measured.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _as_returned(name: str, config: Any, text: str | None) -> str:
    return text or ""


@dataclass(frozen=True)
class Command:
    """One subcommand: its settings dataclass (every field a --flag), what runs it and what it prints."""

    config: type
    run: Callable[[Any], Any]
    help: str
    report: Report
    presets: dict[str, dict[str, Any]] | None = None  # starting values --preset chooses from (the help lists each)
    preset: str | None = None  # the one used when --preset is not given (None: the dataclass's own defaults)
    choose_preset: bool = True  # False: --preset is not a flag (demo is always cpu)
    aliases: tuple[str, ...] = ()
    description: str | None = None  # default: the config's docstring


GROUPS = {"bench": "speed and memory, as ratios measured in one run"}  # commands of two words: `bench train`
COMMANDS: dict[str, Command] = {  # the command line, one row per command
    "demo": Command(SyntheticConfig, run_synthetic, "run the embedded default: the synthetic experiment, cpu preset",
                    _experiment, {"cpu": SyntheticConfig.PRESETS["cpu"]}, "cpu", choose_preset=False),
    "synthetic": Command(SyntheticConfig, run_synthetic,
                         "vanilla vs myopic twins on the synthetic pre-caching task, probed layer by layer",
                         _experiment, SyntheticConfig.PRESETS, "cpu"),
    "pathstar": Command(PathStarConfig, run_pathstar,
                        "path-star graphs: each regime × (vanilla, myopic), accuracy and planning probes",
                        _experiment, PathStarConfig.PRESETS, "cpu"),
    "pathstar-data": Command(PathStarDataConfig, run_pathstar_data, "write disjoint train/test files of G(d, l, N)",
                             _as_returned),
    "train": Command(LMTrainConfig, train_lm, "train a language model on text, vanilla or --myopic", _trained,
                     {"no preset": {}, **LM_TRAIN_PRESETS}),
    "probe": Command(ProbeConfig, run_probe, "future-token probes for every (layer, τ) of checkpoints", _analysis),
    "precache": Command(PrecacheConfig, run_precache, "pre-caching vs breadcrumbs for a vanilla/myopic twin pair",
                        _analysis),
    "compare": Command(CompareConfig, run_compare, "the interactive comparison figure of a probe or precache run",
                       _compared),
    "gap": Command(GapConfig, run_gap, "myopia gap of twins and future-gradient share per layer", _analysis),
    "seeds": Command(AcrossConfig, run_seeds,
                     "spread between runs (training seeds) of gap / precache / probe results", _analysis),
    "trend": Command(AcrossConfig, run_trend, "myopia gap of gap runs against model size", _analysis),
    "figures": Command(FiguresConfig, run_figures, "regenerate every figure in figures/ from the embedded default",
                       _as_returned, description="Runs, in order: " + "; ".join(f"forethought {c}" for c in FIGURES)),
    "bench train": Command(TrainBenchConfig, bench_train,
                           "training step: tokens/s and memory, myopic (fast, naive) ÷ vanilla", _benched,
                           aliases=("myopic",)),  # `bench myopic`: its old name
    "bench probe": Command(ProbeBenchConfig, bench_probe,
                           "caching and probe fitting: throughput, and torch ÷ sklearn time", _benched),
    "bench cache": Command(CacheBenchConfig, bench_cache,
                           "residual caching through the bridge ÷ a bare Hugging Face forward pass", _benched),
    "bench pathstar": Command(PathStarBenchConfig, bench_pathstar,
                              "path-star text files: generate, write, parse, vectorised ÷ line by line", _benched),
}


def _field_help(cls: type) -> dict[str, str]:
    """Help for each field, from the comment after it in the source of the class (or a base class)."""
    helps: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if k is not object and "__dataclass_fields__" in vars(k)]):
        source = inspect.getsource(klass)
        helps.update(re.findall(r"^\s+(\w+): [^=\n]+= [^#\n]+#\s*(.+)$", source, flags=re.MULTILINE))
    return helps


def _own_fields_first(cls: type) -> list[Field]:
    """The dataclass's fields, those a class declares itself before those it inherits (``--checkpoints`` before
    the shared probe settings)."""
    order = [name for klass in cls.__mro__ for name in vars(klass).get("__annotations__", {})]
    return sorted(fields(cls), key=lambda f: order.index(f.name))


def _list_from_text(kind: str, name: str, text: str) -> object:
    """A list flag's value (:func:`core.settings.from_text`); a bad one is the parser's one-line error."""
    try:
        return from_text(kind, text, name)
    except ForethoughtError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _default_text(value: object, listed: str | None) -> str:
    """A default as the command line writes it ('all' for an int list's None)."""
    if listed is None or (value is None and not listed.startswith("tuple[int")):
        return str(value)
    return "all" if value is None else as_text(value)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    presets: dict[str, dict] | None = None,
) -> None:
    """One ``--flag`` per dataclass field; flags left out are absent from the parsed namespace.

    With ``presets``, the help shows each preset's value where one differs from the class default.
    """
    for f, default, helps, listed in _flags(cls):
        if f.name in skip:
            continue
        kind = str(f.type)
        options: dict = {"default": argparse.SUPPRESS, "dest": f.name}
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif listed:
            options["type"] = functools.partial(_list_from_text, listed, f.name)
            options["metavar"] = LIST_KINDS[listed]
        else:
            options["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            options["metavar"] = options["type"].__name__.upper()
        values = {name: preset.get(f.name, default) for name, preset in (presets or {"": {}}).items()}
        texts = {name: _default_text(value, listed) for name, value in values.items()}
        if len(set(texts.values())) == 1:
            shown = f"default: {next(iter(texts.values()))}"
        else:
            shown = ", ".join(f"{name}: {text}" for name, text in texts.items())
        options["help"] = f"{helps.get(f.name, '')} ({shown})".strip().replace("%", "%%")  # argparse formats help
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def _flags(cls: type) -> list[tuple[Field, Any, dict[str, str], str | None]]:
    """(field, default, helps, list kind) of each flag of the config dataclass ``cls``, its own fields first; a
    nested settings field (``training``) gives one flag per field of its class in its place, with the config's
    default for it."""
    nested, lists, flags = nested_settings(cls), list_kinds(cls), []
    for f in _own_fields_first(cls):
        default = field_default(f)
        if f.name in nested:
            helps = _field_help(nested[f.name])
            flags += [(g, getattr(default, g.name), helps, None) for g in fields(nested[f.name])]
        else:
            flags.append((f, default, _field_help(cls), lists.get(f.name)))
    return flags


class _OneLineErrors(argparse.ArgumentParser):
    """A parser whose errors (an unknown flag, a value that is not a number) are :class:`ForethoughtError`: one
    line naming the problem and exit code 2, like every other bad input. Subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("forethought").strip()  # "probe", "bench train"; "" for the top level
        raise ForethoughtError(f"{command}: {message}" if command else message)


def build_parser() -> argparse.ArgumentParser:
    """One subparser per row of :data:`COMMANDS` (``bench train``: ``train`` under ``bench``)."""
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
            member or name, aliases=command.aliases, help=command.help,
            description=command.description or command.config.__doc__)
        add_config_arguments(subparser, command.config, skip=() if command.choose_preset else ("preset",),
                             presets=command.presets)
    return parser


class _ProgressSafeHandler(logging.Handler):
    """Log records as plain lines on the current stderr, written around any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def show_library_logs() -> None:
    """The workbench's own log records (the ``forethought`` loggers; INFO and up) on stderr."""
    logger = logging.getLogger("forethought")
    if not logger.handlers:
        logger.addHandler(_ProgressSafeHandler())
        logger.setLevel(logging.INFO)


@quiet_loading()
def main(argv: list[str] | None = None) -> int:
    show_library_logs()
    try:
        args = vars(build_parser().parse_args(argv))
        name = args.pop("command")
        if name in GROUPS:
            member = args.pop(name)
            name = next(key for key, row in COMMANDS.items() if key == f"{name} {member}" or member in row.aliases)
        command = COMMANDS[name]
        preset = args.pop("preset", command.preset)
        config = command.config.from_preset(preset, **args) if preset else build_config(command.config, args)
        if report := command.report(name, config, command.run(config)):
            print(report)
    except ForethoughtError as error:
        print(f"forethought: error: {one_line(error, limit=10_000)}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk or the file system refused (full, read-only, permissions)
        where = f": {error.filename}" if error.filename else ""
        print(f"forethought: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forethought: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def cli_reference() -> str:
    """The help of the command and of every subcommand, as Markdown (collapsed blocks), 100 columns wide."""
    parser = build_parser()
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
