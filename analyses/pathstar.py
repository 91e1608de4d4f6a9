"""Path-star (Bachmann & Nagarajan 2024): the Clever Hans cheat, its remedies, and whether the model plans.

For each training regime (teacher forcing, teacherless, reverse) × (vanilla, myopic), train a GPT-2 on
path-star graphs, then measure on held-out graphs: greedy-decoded exact-path accuracy, per-position accuracy
(position 2 of the path is the real decision), teacher-forced per-token accuracy, beside chance 1/d. Then
probe every layer's residual stream at ``=`` and at each target position for the plan: which arm leads to
the goal (d classes) and the node τ steps ahead in the emitted sequence — with a random-init control.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from forethought.analyses.experiment import ExperimentConfig, ExperimentResults, finish_run, prepare_out, writes_run
from forethought.analyses.plots import facet_labels_as_values
from forethought.analyses.results import CONTROL, run_meta, tidy
from forethought.core.errors import ForethoughtError
from forethought.core.files import check_free_space, check_out_folder
from forethought.core.offsets import at_offset
from forethought.core.settings import check_settings
from forethought.models.gpt2 import build_lm, gpt2_config
from forethought.models.tasks.pathstar import PathStarData, PathStarSpec, PathStarTask, check_regime, generate_split
from forethought.models.train import TrainSettings, train
from forethought.probes.fit import fit_logistic_by_layer
from forethought.probes.metrics import mean_scores
from forethought.probes.residuals import model_residuals
from forethought.probes.split import split_sequences

log = logging.getLogger(__name__)

TRAININGS = {"vanilla": False, "myopic": True}


@dataclass
class PathStarConfig(ExperimentConfig):
    """Settings of ``forethought pathstar``; every field is also a command-line flag."""

    # graphs G(degree, length, n_nodes), generated unless files are given (then d and l are the files', N at least
    # their largest label + 1)
    degree: int = 2  # d: arms leaving the start node
    length: int = 5  # l: nodes on the path, start included
    n_nodes: int = 50  # N: labels 0 … N − 1
    n_train: int = 200000  # training graphs drawn (without files)
    n_test: int = 20000  # test graphs drawn, none of them a training graph
    train_file: str | None = None  # a data file in the paper's format (e.g. its released ones)
    test_file: str | None = None  # its test file (default: test graphs drawn apart from the training file's)
    # what to train
    regimes: tuple[str, ...] = ("teacher-forcing", "teacherless", "reverse")  # regimes trained (docs/pathstar.md)
    trainings: tuple[str, ...] = ("vanilla", "myopic")  # vanilla and/or myopic
    n_layer: int = 6  # transformer blocks
    d_model: int = 384  # residual width
    n_head: int = 6  # attention heads
    epochs: float = 50.0  # passes over the training set (steps = ceil(`epochs` · `n_train` / `batch_size`))
    prefix_loss: bool = False  # also train both twins to predict the edge list (myopic prefix positions then learn)
    # the paper's: batch 256, AdamW lr 1e-4, no weight decay (its code ignored its weight-decay flag)
    training: TrainSettings = field(default_factory=lambda: TrainSettings(
        batch_size=256, lr=1e-4, weight_decay=0.0, eval_every=1000, checkpoint_every=5000))
    # evaluation and probes
    eval_samples: int = 2000  # graphs decoded greedily, from each of train and test
    probe_samples: int = 2000  # test graphs whose residual streams are probed
    probe_test_fraction: float = 0.25  # share of the probed graphs the probes are scored on
    out: str = "runs/pathstar"  # run folder: results, checkpoints, figures (resumed when rerun)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},  # 6 layers × 384, 6 heads, batch 256, AdamW lr 1e-4, 200k / 20k graphs of G(2, 5, 50)
        "cpu": {
            "length": 4, "n_nodes": 20, "n_train": 50000, "n_test": 2000, "n_layer": 2, "d_model": 64,
            "n_head": 2, "epochs": 10.0, "batch_size": 128, "lr": 1e-3, "warmup_frac": 0.05, "eval_every": 250,
            "checkpoint_every": 1000, "out": "runs/pathstar-cpu",
        },
    }

    def __post_init__(self):
        super().__post_init__()
        if self.train_file is None:
            self.spec()  # validates d, l, N
        for regime in self.regimes:
            check_regime(regime)
        unknown = set(self.trainings) - set(TRAININGS)
        if unknown or not self.trainings:
            raise ForethoughtError(f"unknown training {sorted(unknown)}; choose from vanilla, myopic")
        if (self.train_file is None) != (self.test_file is None):
            raise ForethoughtError("give both `train_file` and `test_file`, or neither")
        if self.train_file is not None and Path(self.train_file).resolve() == Path(self.test_file).resolve():
            raise ForethoughtError(f"`train_file` and `test_file` are the same file ({self.train_file}): the test "
                                   "graphs must be other graphs")

    def spec(self) -> PathStarSpec:
        return PathStarSpec(self.degree, self.length, self.n_nodes)

    def steps(self, n_train: int) -> int:
        return self.training.epoch_steps(self.epochs, n_train)

@dataclass
class PathStarResults(ExperimentResults):
    """The tidy table of a path-star run, with the training histories and figure methods."""

    CONFIG: ClassVar[type] = PathStarConfig

    @property
    def chance(self) -> float:
        return 1 / self.config.degree

    def accuracy_table(self, split: str = "test") -> pd.DataFrame:
        """Per (regime, training): exact-path accuracy, decision-token accuracy (path position 2, greedy)
        and teacher-forced accuracy on positions ≥ 3 (the Clever Hans signature: ≈ 1 while decision ≈ 1/d)."""
        t = self.table[self.table["split"] == split]
        rows = []
        later = [f"position {k}" for k in range(3, self.config.length + 1)]
        trained = t[t["checkpoint"].isin(list(TRAININGS))]
        for (task, checkpoint), group in trained.groupby(["task", "checkpoint"], sort=False):
            rows.append({
                "regime": task.split(":", 1)[1], "training": checkpoint,
                "exact_path": float(_values(group, "exact_path", ["path"]).iloc[0]),
                "decision_token": float(_values(group, "position_accuracy", ["position 2"]).iloc[0]),
                "forced_positions_3+": float(_values(group, "forced_accuracy", later).mean()),
            })
        return pd.DataFrame(rows)

    def accuracy_figure(self) -> go.Figure:
        """Regime × training heatmap of this run's held-out exact-path accuracy, with the exact-path and
        decision-token accuracies and their 95 % intervals over graphs in the cells."""
        table = self.accuracy_table()
        exact = table.pivot(index="regime", columns="training", values="exact_path")
        held_out = self.table[(self.table["split"] == "test") & self.table["checkpoint"].isin(list(TRAININGS))]

        def cell(regime: str, training: str) -> str:
            rows = held_out[(held_out["task"].str.endswith(f":{regime}")) & (held_out["checkpoint"] == training)]
            found = [rows[(rows["metric"] == metric) & (rows["target"] == target)].iloc[0]
                     for metric, target in (("exact_path", "path"), ("position_accuracy", "position 2"))]
            return "<br>".join(f"{what} {r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                               for what, r in zip(("exact", "decision"), found))

        text = [[cell(regime, training) for training in exact.columns] for regime in exact.index]
        figure = go.Figure(go.Heatmap(z=exact.values, x=list(exact.columns), y=list(exact.index), text=text,
                                      texttemplate="%{text}", zmin=0, zmax=1, colorscale="Viridis",
                                      colorbar=dict(title="exact path")))
        figure.update_layout(
            title=f"Path-star {self.config.spec()}, training seed {self.config.seed}: held-out greedy accuracy "
                  "[95% CI over graphs]<br><sup>decision token (which arm): 1/d = "
                  f"{self.chance:.2f} for a model that names an arm at random; other seeds: forethought "
                  "seeds</sup>", margin=dict(t=100))
        return figure

    def position_figure(self) -> go.Figure:
        """Accuracy by path position (greedy and teacher-forced), one panel per training, chance dashed."""
        rows = self.table[self.table["metric"].isin(["position_accuracy", "forced_accuracy"])
                          & (self.table["split"] == "test") & self.table["checkpoint"].isin(list(TRAININGS))]
        rows = rows.assign(path_position=rows["target"].str.split().str[1].astype(int),
                           regime=rows["task"].str.split(":").str[1],
                           how=rows["metric"].map({"position_accuracy": "greedy", "forced_accuracy": "teacher-forced"}))
        figure = px.line(rows, x="path_position", y="value", color="regime", line_dash="how",
                         facet_col="checkpoint", markers=True, range_y=[-0.02, 1.02],
                         labels={"path_position": "path position (1 = start, 2 = the decision)", "value": "accuracy"},
                         title=f"Path-star {self.config.spec()}: held-out accuracy by path position<br><sup>dotted: "
                               f"1/d = {self.chance:.2f}, an arm named at random at the decision; teacherless reads "
                               "the same forced as greedy (its inputs are the dummy '$')</sup>")
        figure.add_hline(y=self.chance, line_dash="dot", line_color="gray")
        figure.update_layout(margin=dict(t=100))
        facet_labels_as_values(figure)
        return figure

    def probe_figure(self, position: int = 0) -> go.Figure:
        """Planning-probe accuracy by layer at target position ``position`` (0 = ``=``): goal arm and the node
        τ steps ahead; rows = regimes, columns = vanilla / myopic / random init."""
        rows = self.table[(self.table["metric"] == "accuracy") & (self.table["position"] == position)]
        rows = rows.assign(
            probe_target=np.where(rows["target"] == "goal arm", "goal arm",
                                  "node τ=" + rows["tau"].astype("string").fillna("")),
            regime=rows["task"].str.split(":").str[1],
        )
        figure = px.line(rows, x="layer", y="value", color="probe_target", facet_row="regime",
                         facet_col="checkpoint", markers=True, range_y=[-0.02, 1.02],
                         labels={"value": "probe accuracy", "probe_target": "probe for"},
                         title=f"Path-star {self.config.spec()}: planning probes at target position {position} "
                               f"(0 = '='), held-out graphs<br><sup>goal arm: 1/d = {self.chance:.2f} for a "
                               "random guess (dotted)" + (", while layer 0 (the same '=' in every graph) scores the "
                               "held-out rate of the training majority arm" if position == 0 else "") + "</sup>")
        figure.add_hline(y=self.chance, line_dash="dot", line_color="gray")
        figure.update_layout(margin=dict(t=100))
        figure.update_xaxes(dtick=1)
        facet_labels_as_values(figure)
        return figure

    def figures(self) -> dict[str, go.Figure]:
        return {"pathstar_accuracy": self.accuracy_figure(), "pathstar_positions": self.position_figure(),
                "pathstar_probes": self.probe_figure()}

    def summary(self) -> str:
        table = self.accuracy_table()
        lines = [f"path-star {self.config.spec()}, held-out graphs (chance {self.chance:.2f} on the decision):",
                 table.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
        arm = self.table[(self.table["target"] == "goal arm") & (self.table["position"] == 0)
                         & (self.table["metric"] == "accuracy")]
        by_layer = arm.pivot_table(index=["task", "checkpoint"], columns="layer", values="value", sort=False)
        lines += ["goal-arm probe accuracy at '=' by layer (layer 0 reads the same '=' token in every graph:",
                  "it scores the majority-class rate)", by_layer.to_string(float_format=lambda v: f"{v:.3f}")]
        return "\n".join(lines) + "\n"


@writes_run
def run_pathstar(config: PathStarConfig) -> PathStarResults:
    """Train every (regime, training) pair, evaluate, probe, and write table, meta and figures."""
    if config.train_file is not None:  # d, l and N come from the graphs (N: at least their largest label + 1)
        train_data, test_data = PathStarData.load(config.train_file), PathStarData.load(config.test_file)
        if test_data.spec.degree != train_data.spec.degree or test_data.spec.length != train_data.spec.length:
            raise ForethoughtError(f"train file is {train_data.spec} but test file is {test_data.spec}")
        n_nodes = max(config.n_nodes, train_data.spec.n_nodes, test_data.spec.n_nodes)
        train_data, test_data = (
            replace(data, spec=replace(data.spec, n_nodes=n_nodes)) for data in (train_data, test_data)
        )
        if (config.degree, config.length) != (train_data.spec.degree, train_data.spec.length):
            log.warning("the graphs in %s have degree %d and length %d: those are used, not degree %d and length "
                        "%d", config.train_file, train_data.spec.degree, train_data.spec.length, config.degree,
                        config.length)
        config = replace(config, degree=train_data.spec.degree, length=train_data.spec.length, n_nodes=n_nodes)
    else:
        train_data, test_data = generate_split(config.spec(), config.n_train, config.n_test, seed=config.seed)
    spec = train_data.spec
    overlap = len(set(test_data.keys().tolist()) & set(train_data.keys().tolist()))
    evaluated = {split: data.subset(np.arange(min(config.eval_samples, len(data))))
                 for split, data in (("train", train_data), ("test", test_data))}
    out = prepare_out(config.out, config)
    model_config = gpt2_config(config.n_layer, config.d_model, config.n_head, vocab_size=spec.vocab_size,
                               n_positions=spec.prefix_len + spec.length)
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, float]]] = {}
    for regime in config.regimes:
        task = PathStarTask(train_data, regime, config.prefix_loss)
        models = {}
        for training in config.trainings:
            run = train(build_lm(model_config, seed=config.seed), task,
                        config.train_config(TRAININGS[training], config.steps(len(train_data))),
                        out / regime / training)
            models[training], histories[f"{regime} / {training}"] = run.model, run.history
            for split, data in evaluated.items():
                rows += [{**r, "checkpoint": training, "task": f"pathstar:{regime}", "split": split}
                         for r in evaluate_model(run.model, data, regime)]
        models[CONTROL] = build_lm(model_config, seed=config.seed)
        probe_data = test_data.subset(np.arange(min(config.probe_samples, len(test_data))))
        for name, model in models.items():
            rows += [{**r, "checkpoint": name, "task": f"pathstar:{regime}", "split": "test"}
                     for r in probe_model(model, probe_data, regime, config)]
    rows.append({"checkpoint": "chance (1/d)", "task": "pathstar", "target": "position 2",
                 "metric": "position_accuracy", "split": "test", "value": 1 / spec.degree})
    table = tidy(rows, seed=config.seed)
    results = PathStarResults(config=config, table=table, histories=histories)
    finish_run(results, out, run_meta(
        data=f"path-star {spec}: {len(train_data)} train / {len(test_data)} test graphs "
        + (f"from {config.train_file} / {config.test_file}" if config.train_file else
           f"generated with seed {config.seed}, test samples seen in training redrawn")
        + f"; test samples whose edges and query also occur in training: {overlap}",
        processing_mode="raw (Hugging Face forward hooks)",
    ))
    return results


@torch.no_grad()
def decode(model, data: PathStarData, regime: str, batch: int = 500) -> np.ndarray:
    """Greedy decoding of the emitted sequence [n, l]: token by token, or (teacherless) all at once after
    l − 1 dummy tokens."""
    model.eval()
    device = next(model.parameters()).device
    prefix = torch.from_numpy(data.prefix_tokens())
    outputs = []
    for chunk in prefix.split(batch):
        sequence = chunk.to(device)
        if regime == "teacherless":
            dummies = torch.full((len(chunk), data.spec.length - 1), data.spec.dollar, device=device)
            logits = model(torch.cat([sequence, dummies], dim=1), use_cache=False).logits
            outputs.append(logits[:, data.spec.prefix_len - 1 :].argmax(-1).cpu())
            continue
        for _ in range(data.spec.length):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
        outputs.append(sequence[:, data.spec.prefix_len :].cpu())
    return torch.cat(outputs).numpy()


@torch.no_grad()
def forced_predictions(model, data: PathStarData, regime: str, batch: int = 500) -> np.ndarray:
    """Argmax predictions [n, l] of the target tokens given the regime's own training inputs."""
    model.eval()
    device = next(model.parameters()).device
    inputs, _ = data.sequences(regime)
    start = data.spec.prefix_len - 1
    predictions = [model(chunk.to(device), use_cache=False).logits[:, start:].argmax(-1).cpu()
                   for chunk in torch.from_numpy(inputs).split(batch)]
    return torch.cat(predictions).numpy()


def evaluate_model(model, data: PathStarData, regime: str) -> list[dict[str, Any]]:
    """Exact-path accuracy, and greedy / teacher-forced accuracy per path position (forward order)."""
    target = data.target(regime)
    graph_ids = np.arange(len(data))
    rows = []
    for metric, predicted in (("position_accuracy", decode(model, data, regime)),
                              ("forced_accuracy", forced_predictions(model, data, regime))):
        hits = predicted == target  # [n, l] in emitted order
        if regime == "reverse":
            hits = hits[:, ::-1]  # back to path order: position 2 is always the decision
        estimates = mean_scores(hits.astype(float), graph_ids)
        rows += [{"target": f"position {k}", "metric": metric, **e.columns()} for k, e in enumerate(estimates, 1)]
        if metric == "position_accuracy":
            (exact,) = mean_scores(hits.all(axis=1).astype(float), graph_ids)
            rows.append({"target": "path", "metric": "exact_path", **exact.columns()})
    return rows


def probe_model(model, data: PathStarData, regime: str, config: PathStarConfig) -> list[dict[str, Any]]:
    """Softmax probes per layer at each target position: the goal arm, and the emitted node τ ahead."""
    spec = data.spec
    inputs, _ = data.sequences(regime)
    device = next(model.parameters()).device
    model.eval()
    residuals = torch.cat([model_residuals(model, chunk.to(device)).float().cpu()
                           for chunk in torch.from_numpy(inputs).split(500)], dim=1)
    positions = np.arange(spec.prefix_len - 1, spec.prefix_len - 1 + spec.length)  # '=' and targets 1 … l−1
    residuals = residuals[:, :, positions].numpy()  # [layers, n, l, d_model]
    layers = list(range(len(residuals)))
    split = split_sequences(len(data), config.probe_test_fraction, seed=config.seed)
    emitted, arm = data.target(regime), data.goal_arm()
    rows = []
    for position in range(spec.length):
        here = np.array([position])
        for row in fit_logistic_by_layer(residuals, np.repeat(arm[:, None], spec.length, 1), "goal arm",
                                        spec.degree, layers, here, split).to_dict("records"):
            rows.append({**row, "position": position, "probe": "logistic"})
        for tau in range(1, spec.length - position + 1):  # x[t+τ] is emitted at t + τ − 1
            labels = np.zeros((len(data), spec.length), dtype=np.int64)
            labels[:, position] = at_offset(emitted, tau - 1, spec.length - tau + 1)[:, position]
            for row in fit_logistic_by_layer(residuals, labels, "next node", spec.n_nodes, layers,
                                            here, split).to_dict("records"):
                rows.append({**row, "position": position, "tau": tau, "probe": "logistic"})
    return rows


def _values(rows: pd.DataFrame, metric: str, targets: list[str]) -> pd.Series:
    return rows[(rows["metric"] == metric) & rows["target"].isin(targets)]["value"]


@dataclass
class PathStarDataConfig:
    """Settings of ``forethought pathstar-data``: disjoint train/test files of G(d, l, N) in the paper's format
    and file names (``deg_D_path_L_nodes_N_train_COUNT.txt`` and ``…_test_COUNT.txt``)."""

    degree: int = 5  # d: arms leaving the start node
    length: int = 5  # l: nodes on the path, start included
    n_nodes: int = 50  # N: labels 0 … N − 1
    n_train: int = 200000  # training graphs
    n_test: int = 20000  # test graphs, none of them a training graph
    seed: int = 0  # seeds the graphs drawn
    out: str = "data"  # folder for the two files

    def __post_init__(self):
        check_settings(self)
        self.spec()  # validates d, l, N

    def spec(self) -> PathStarSpec:
        return PathStarSpec(self.degree, self.length, self.n_nodes)

    def paths(self) -> dict[str, Path]:
        """{split: file} of the two files."""
        stem = f"deg_{self.degree}_path_{self.length}_nodes_{self.n_nodes}"
        return {split: Path(self.out) / f"{stem}_{split}_{n}.txt" for split, n in (("train", self.n_train),
                                                                                 ("test", self.n_test))}


def run_pathstar_data(config: PathStarDataConfig) -> str:
    """Generate the two sets (disjoint) and write them; files already there (another seed's, say) are never
    overwritten. Returns what was written, in words."""
    folder, paths = check_out_folder(config.out), config.paths()
    if taken := [str(path) for path in paths.values() if path.exists()]:
        raise ForethoughtError(f"{' and '.join(taken)} already exist; remove them or choose another `out`")
    spec = config.spec()
    line_bytes = 4 * (2 * spec.n_edges + 2 + config.length)  # ≤ 3 digits and a separator per label
    check_free_space(folder, (config.n_train + config.n_test) * line_bytes, "pathstar-data")
    started = time.perf_counter()
    train_data, test_data = generate_split(spec, config.n_train, config.n_test, seed=config.seed)
    generated = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    for data, split in ((train_data, "train"), (test_data, "test")):
        data.save(paths[split])
    return "\n".join([*(f"wrote {path}" for path in paths.values()),
                      f"generated {config.n_train + config.n_test:,} samples of {spec} in {generated:.2f} s "
                      f"(writing text: {time.perf_counter() - started - generated:.2f} s)"])
