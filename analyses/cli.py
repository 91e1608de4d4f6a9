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
import time
from dataclasses import MISSING, Field, fields
from pathlib import Path

from tqdm.auto import tqdm

from analyses.across import AcrossConfig, run_seeds, run_trend
from analyses.bench import (
    CacheBenchConfig,
    PathStarBenchConfig,
    ProbeBenchConfig,
    TrainBenchConfig,
    bench_cache,
    bench_pathstar,
    bench_probe,
    bench_train,
)
from analyses.compare import CompareConfig, run_compare
from analyses.gap import GapConfig, run_gap
from analyses.pathstar import PathStarConfig, run_pathstar
from analyses.precache import PrecacheConfig, run_precache
from analyses.probe import ProbeConfig, run_probe
from analyses.synthetic import SyntheticConfig, run_synthetic
from models.errors import ForethoughtError
from models.files import check_free_space
from models.gpt2 import quiet_loading
from models.lm import LM_TRAIN_PRESETS, LMTrainConfig, train_lm
from models.tasks.pathstar import PathStarSpec, generate_split

EXPERIMENTS = {  # command: (config dataclass, run function, help)
    "synthetic": (SyntheticConfig, run_synthetic,
                  "vanilla vs myopic twins on the synthetic pre-caching task, probed layer by layer"),
    "pathstar": (PathStarConfig, run_pathstar,
                 "path-star graphs: each regime × (vanilla, myopic), accuracy and planning probes"),
}


ANALYSES = {  # command: (config dataclass, run function) for analyses of trained checkpoints
    "probe": (ProbeConfig, run_probe),
    "precache": (PrecacheConfig, run_precache),
    "gap": (GapConfig, run_gap),
    "seeds": (AcrossConfig, run_seeds),
    "trend": (AcrossConfig, run_trend),
}
BENCHES = {"train": (TrainBenchConfig, bench_train), "probe": (ProbeBenchConfig, bench_probe),
           "cache": (CacheBenchConfig, bench_cache), "pathstar": (PathStarBenchConfig, bench_pathstar)}

# Every figure in figures/, from the embedded default (a few hours on 2 CPU cores; each step resumes or reuses
# what an earlier run left in runs/, so a rerun redoes only what changed).
CPU_SEEDS, CPU_SIZES = (0, 1, 2), ("gpt2-nano",)  # the cpu preset's pair over seeds; a smaller size
_PAIRS = {**{f"cpu-s{seed}": f"--seed {seed}" for seed in CPU_SEEDS},
          **{f"cpu-{size}": f"--model {size}" for size in CPU_SIZES}}
SMOLLM2_FINE_TUNE = (  # Wu et al.'s Pythia protocol (fine-tune from the pretrained weights), at CPU scale
    "--model smollm2-135m --from-pretrained --tokenizer smollm2-135m --corpus embedded --layout packed --seq-len 64 "
    "--batch-size 16 --steps 300 --lr 1e-4 --warmup-frac 0.05 --precision bfloat16 --eval-every 30 --eval-batches 4 "
    "--checkpoint-every 150")
SMOLLM2_SEEDS = (0, 1, 2)  # fine-tuning seeds (data order); ~28 min a twin on this CPU
FIGURES = [
    *[
        f"{command} --seed {seed} --out runs/{name}-s{seed}" + (" --figures-dir figures" if seed == 0 else "")
        for command, name in (("demo", "demo"), ("pathstar", "pathstar-cpu"))
        for seed in CPU_SEEDS
    ],
    *[
        f"seeds --runs {','.join(f'runs/{name}-s{seed}' for seed in CPU_SEEDS)} --out runs/seeds-{name}"
        for name in ("demo", "pathstar-cpu")
    ],
    *[
        f"train --preset cpu {flags} --out runs/lm-{pair}-{twin}" + (" --myopic" if twin == "myopic" else "")
        for pair, flags in _PAIRS.items()
        for twin in ("vanilla", "myopic")
    ],
    *[
        f"gap --vanilla runs/lm-{pair}-vanilla --myopic runs/lm-{pair}-myopic --out runs/gap-{pair}"
        + (" --figures-dir figures" if pair == "cpu-s0" else "")
        for pair in _PAIRS
    ],
    *[
        f"precache --vanilla runs/lm-cpu-s{seed}-vanilla --myopic runs/lm-cpu-s{seed}-myopic --precision bfloat16 "
        f"--max-sequences 1000 --max-epochs 10 --out runs/precache-cpu-s{seed}"
        + (" --figures-dir figures" if seed == 0 else " --no-random-init")
        for seed in CPU_SEEDS
    ],  # one control
    "seeds --runs " + ",".join(f"runs/gap-cpu-s{seed}" for seed in CPU_SEEDS) + " --out runs/seeds-gap-cpu "
    "--figures-dir figures",
    "seeds --runs " + ",".join(f"runs/precache-cpu-s{seed}" for seed in CPU_SEEDS) + " --out runs/seeds-precache-cpu "
    "--figures-dir figures",
    "trend --runs " + ",".join(f"runs/gap-{pair}" for pair in _PAIRS) + " --out runs/trend-cpu --figures-dir figures",
    "compare --run runs/precache-cpu-s0 --figures-dir figures",
    "probe --checkpoints smollm2-135m --corpus embedded:gutenberg --layout packed --seq-len 64 --max-sequences 2000 "
    "--kind topk --top-k 1000 --precision bfloat16 --batch-sequences 32 --max-epochs 4 --out runs/probe-smollm2 "
    "--figures-dir figures",
    "gap --vanilla smollm2-135m --corpus embedded --layout packed --seq-len 64 --max-sequences 256 "
    "--share-sequences 64 --batch-size 8 --out runs/gap-smollm2 --figures-dir figures/smollm2",
    *[
        f"train {SMOLLM2_FINE_TUNE} --seed {seed} --out runs/ft-smollm2-s{seed}-{twin}"
        + (" --myopic" if twin == "myopic" else "")
        for seed in SMOLLM2_SEEDS
        for twin in ("vanilla", "myopic")
    ],
    *[
        f"gap --vanilla runs/ft-smollm2-s{seed}-vanilla --myopic runs/ft-smollm2-s{seed}-myopic --max-sequences 1000 "
        f"--share-sequences 32 --batch-size 8 --out runs/gap-ft-smollm2-s{seed}"
        + (" --figures-dir figures/smollm2-finetune" if seed == 0 else "")
        for seed in SMOLLM2_SEEDS
    ],
    "seeds --runs "
    + ",".join(f"runs/gap-ft-smollm2-s{seed}" for seed in SMOLLM2_SEEDS)
    + " --out runs/seeds-gap-ft-smollm2 --figures-dir figures/smollm2-finetune",
]


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


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    presets: dict[str, dict] | None = None,
) -> None:
    """One ``--flag`` per dataclass field; flags left out are absent from the parsed namespace.

    With ``presets``, the help shows each preset's value where one differs from the class default.
    """
    helps = _field_help(cls)
    for f in _own_fields_first(cls):
        if f.name in skip:
            continue
        kind = str(f.type)
        options: dict = {"default": argparse.SUPPRESS, "dest": f.name}
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            options["metavar"] = options["type"].__name__.upper()
        default = f.default if f.default is not MISSING else None
        values = {name: preset.get(f.name, default) for name, preset in (presets or {"": {}}).items()}
        if len({str(value) for value in values.values()}) == 1:
            shown = f"default: {next(iter(values.values()))}"
        else:
            shown = ", ".join(f"{name}: {value}" for name, value in values.items())
        options["help"] = f"{helps.get(f.name, '')} ({shown})".strip().replace("%", "%%")  # argparse formats help
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forethought", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the embedded default: the synthetic experiment, cpu preset")
    add_config_arguments(demo, SyntheticConfig, skip=("preset",), presets={"cpu": SyntheticConfig.PRESETS["cpu"]})
    for name, (config_class, _, help_text) in EXPERIMENTS.items():
        experiment = commands.add_parser(name, help=help_text, description=config_class.__doc__)
        experiment.add_argument("--preset", default="cpu",
                                help=f"starting values: {' or '.join(config_class.PRESETS)} (default: cpu)")
        add_config_arguments(experiment, config_class, skip=("preset",), presets=config_class.PRESETS)
    data = commands.add_parser("pathstar-data", help="write disjoint train/test files of G(d, l, N)")
    data.add_argument("--degree", type=int, default=5, help="d (default: 5)")
    data.add_argument("--length", type=int, default=5, help="l (default: 5)")
    data.add_argument("--n-nodes", type=int, default=50, help="N (default: 50)")
    data.add_argument("--n-train", type=int, default=200000, help="(default: 200000)")
    data.add_argument("--n-test", type=int, default=20000, help="(default: 20000)")
    data.add_argument("--seed", type=int, default=0, help="(default: 0)")
    data.add_argument("--out", default="data", help="folder for the two files (default: data)")

    for name, config_class, help_text, skip in (
        ("train", LMTrainConfig, "train a GPT-2 language model on text, vanilla or --myopic", ()),
        ("probe", ProbeConfig, "future-token probes for every (layer, τ) of checkpoints", ()),
        ("precache", PrecacheConfig, "pre-caching vs breadcrumbs for a vanilla/myopic twin pair", ()),
        ("compare", CompareConfig, "the interactive comparison figure of a probe or precache run", ()),
        ("gap", GapConfig, "myopia gap of twins and future-gradient share per layer", ()),
        ("seeds", AcrossConfig, "spread between runs (training seeds) of gap / precache / probe results", ()),
        ("trend", AcrossConfig, "myopia gap of gap runs against model size", ()),
    ):
        command = commands.add_parser(name, help=help_text, description=config_class.__doc__)
        presets = {"no preset": {}, **LM_TRAIN_PRESETS} if config_class is LMTrainConfig else None
        add_config_arguments(command, config_class, skip=skip, presets=presets)

    figures = commands.add_parser("figures", help="regenerate every figure in figures/ from the embedded default",
                                  description="Runs, in order: " + "; ".join(f"forethought {c}" for c in FIGURES))
    figures.add_argument("--dry-run", action="store_true", help="print the commands without running them")

    bench = commands.add_parser("bench", help="speed and memory, as ratios measured in one run")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    train_bench = benches.add_parser("train", aliases=["myopic"], description=TrainBenchConfig.__doc__,
                                     help="training step: tokens/s and memory, myopic (fast, naive) ÷ vanilla")
    add_config_arguments(train_bench, TrainBenchConfig)
    probe_bench = benches.add_parser("probe", description=ProbeBenchConfig.__doc__,
                                     help="caching and probe fitting: throughput, and torch ÷ sklearn time")
    add_config_arguments(probe_bench, ProbeBenchConfig)
    cache_bench = benches.add_parser("cache", description=CacheBenchConfig.__doc__,
                                     help="residual caching through the bridge ÷ a bare Hugging Face forward pass")
    add_config_arguments(cache_bench, CacheBenchConfig)
    pathstar_bench = benches.add_parser("pathstar", description=PathStarBenchConfig.__doc__,
                                        help="path-star text files: generate, write, parse, vectorised ÷ line by line")
    add_config_arguments(pathstar_bench, PathStarBenchConfig)
    return parser


class _ProgressSafeHandler(logging.Handler):
    """Log records as plain lines on the current stderr, written around any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def show_library_logs() -> None:
    """The workbench's own log records (``models``, ``probes``, ``analyses``; INFO and up) on stderr."""
    handler = _ProgressSafeHandler()
    for name in ("models", "probes", "analyses"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


@quiet_loading()
def main(argv: list[str] | None = None) -> int:
    show_library_logs()
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command in ("demo", *EXPERIMENTS):
            config_class, run, _ = EXPERIMENTS.get(command, EXPERIMENTS["synthetic"])
            config = config_class.from_preset(args.pop("preset", "cpu"), **args)
            print(run(config).summary())
            print(f"results, figures and checkpoints in {config.out}")
        elif command == "pathstar-data":
            write_pathstar_data(**args)
        elif command == "train":
            preset = args.pop("preset", None)
            result = train_lm(LMTrainConfig.from_preset(preset, **args) if preset else LMTrainConfig(**args))
            if result.history and int(os.environ.get("RANK", "0")) == 0:  # torchrun: one report
                print(f"step {result.history[-1]['step']}: {_losses(result.history)}")
                print(f"checkpoint: {result.checkpoint}")
        elif command in ANALYSES:
            config_class, run = ANALYSES[command]
            config = config_class(**args)
            print(run(config).summary())
            print(f"results and figures in {config.out}")
        elif command == "compare":
            config = CompareConfig(**args)
            print(repr(run_compare(config)))
            print(f"figure in {config.figures_dir}")
        elif command == "figures":
            for line in FIGURES:
                print(f"forethought {line}", flush=True)
                if not args["dry_run"] and (status := main(line.split())) != 0:
                    return status
        elif command == "bench":
            name = args.pop("bench").replace("myopic", "train")  # `bench myopic` is the old name of `bench train`
            config_class, run = BENCHES[name]
            table = run(config_class(**args))
            print(f"forethought bench {name} — {table.attrs['setting']}")
            measured = table.dropna(axis=1, how="all")  # memory columns are CUDA-only
            print(measured.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    except ForethoughtError as error:
        print(f"forethought: error: {' '.join(str(error).split())}", file=sys.stderr)  # one line
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


def write_pathstar_data(degree: int, length: int, n_nodes: int, n_train: int, n_test: int, seed: int, out: str) -> None:
    """Generate G(d, l, N) train/test sets (disjoint) and write them in the paper's format and file names; files
    already there (another seed's, say) are never overwritten."""
    spec = PathStarSpec(degree, length, n_nodes)
    if min(n_train, n_test) < 1 or seed < 0:
        raise ForethoughtError(f"n_train and n_test must be ≥ 1 and seed ≥ 0, got {n_train}, {n_test}, {seed}")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ForethoughtError(f"--out {folder} is a file, not a folder")
    paths = {split: folder / f"deg_{degree}_path_{length}_nodes_{n_nodes}_{split}_{n}.txt"
             for split, n in (("train", n_train), ("test", n_test))}
    if taken := [str(path) for path in paths.values() if path.exists()]:
        raise ForethoughtError(f"{' and '.join(taken)} already exist; remove them or choose another --out")
    line_bytes = 4 * (2 * spec.n_edges + 2 + length)  # ≤ 3 digits and a separator per label
    check_free_space(folder, (n_train + n_test) * line_bytes, "pathstar-data")
    started = time.perf_counter()
    train, test = generate_split(spec, n_train, n_test, seed=seed)
    generated = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    for data, split in ((train, "train"), (test, "test")):
        data.save(paths[split])
        print(f"wrote {paths[split]}")
    print(f"generated {n_train + n_test:,} samples of {spec} in {generated:.2f} s "
          f"(writing text: {time.perf_counter() - started - generated:.2f} s)")
