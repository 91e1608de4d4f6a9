"""Path-star graphs G(d, l, N) of Bachmann & Nagarajan (2024), their text format, tokens and training regimes.

A graph has a centre (start) node of degree d and d arms of l − 1 further nodes; all 1 + d(l − 1) labels are
distinct integers from 0 … N − 1; edges point outward and are shuffled. The goal is the end of one arm and
the target is the path start → goal, start included. One sample a line, exactly the paper's format::

    32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12=32,34,6,16,12

Numeral tokens (vocabulary N + 4): each label is one token, ``|`` = N, ``=`` = N + 1, ``/`` = N + 2 and the
dummy ``$`` = N + 3; commas are dropped. A sample is P = 3E + 3 prefix tokens (E = d(l − 1) edges; the
prefix ends with ``=``) followed by the l target tokens.

Regimes (loss only on target tokens; the first target token is predicted at ``=``):
``teacher-forcing`` (standard), ``teacherless`` (target inputs replaced by ``$``: all target tokens predicted
in one pass) and ``reverse`` (target goal → start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from transformers import PreTrainedTokenizerBase

from forethought.core.errors import ForethoughtError
from forethought.core.files import atomic_write_text

REGIMES = ("teacher-forcing", "teacherless", "reverse")
IGNORE = -1  # label of positions without loss


def check_regime(regime: str) -> str:
    if regime not in REGIMES:
        raise ForethoughtError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    return regime


@dataclass(frozen=True)
class PathStarSpec:
    """The graph family G(degree, length, n_nodes) and its numeral-token layout."""

    degree: int  # d: arms leaving the start node
    length: int  # l: nodes on the start → goal path, start included
    n_nodes: int  # N: labels are drawn from 0 … N − 1

    def __post_init__(self):
        if self.degree < 2:
            raise ForethoughtError(f"degree d must be at least 2, got {self.degree}")
        if self.length < 2:
            raise ForethoughtError(f"path length l must be at least 2, got {self.length}")
        needed = 1 + self.degree * (self.length - 1)
        if self.n_nodes < needed:
            raise ForethoughtError(
                f"N = {self.n_nodes} labels are too few for G({self.degree}, {self.length}): it has {needed} nodes"
            )

    @property
    def n_edges(self) -> int:
        return self.degree * (self.length - 1)

    @property
    def prefix_len(self) -> int:
        """P: edges (2 tokens each, ``|`` between), ``/``, start, goal, ``=``."""
        return 3 * self.n_edges + 3

    @property
    def vocab_size(self) -> int:
        return self.n_nodes + 4

    @property
    def pipe(self) -> int:
        return self.n_nodes

    @property
    def equals(self) -> int:
        return self.n_nodes + 1

    @property
    def slash(self) -> int:
        return self.n_nodes + 2

    @property
    def dollar(self) -> int:
        return self.n_nodes + 3

    def __str__(self) -> str:
        return f"G({self.degree}, {self.length}, {self.n_nodes})"


@dataclass
class PathStarData:
    """Samples of one graph family as arrays (n samples)."""

    spec: PathStarSpec
    edges: np.ndarray  # [n, E, 2] (parent, child), in the order written
    path: np.ndarray  # [n, l] start → goal

    def __len__(self) -> int:
        return len(self.path)

    @property
    def start(self) -> np.ndarray:
        return self.path[:, 0]

    @property
    def goal(self) -> np.ndarray:
        return self.path[:, -1]

    def subset(self, index: np.ndarray) -> PathStarData:
        return PathStarData(self.spec, self.edges[index], self.path[index])

    def goal_arm(self) -> np.ndarray:
        """[n] which arm holds the goal, arms numbered 0 … d − 1 by where their first edge is written."""
        first_edges = self.edges[:, :, 0] == self.start[:, None]  # [n, E]: edges leaving the start
        order = np.cumsum(first_edges, axis=1) - 1  # arm number of each start edge, by position
        decision = self.path[:, 1]
        is_goal_edge = first_edges & (self.edges[:, :, 1] == decision[:, None])
        return order[is_goal_edge]

    def keys(self) -> np.ndarray:
        """[n] a byte key per sample that ignores edge order: same graph and query ⇔ same key."""
        canonical = np.sort(self.edges[:, :, 0] * self.spec.n_nodes + self.edges[:, :, 1], axis=1)
        rows = np.concatenate([canonical, self.path[:, [0, -1]]], axis=1).astype(np.int32)
        return np.array([row.tobytes() for row in rows])

    # text ---------------------------------------------------------------------------------
    def lines(self) -> list[str]:
        return self.text().splitlines()

    def text(self) -> str:
        """Every sample in the paper's text format, one a line (vectorised: ~1 s for 200k G(5, 5, 50))."""
        return format_text(self.edges, self.path)

    def save(self, path: str | Path) -> None:
        """The samples in the paper's text format, one a line, written atomically."""
        atomic_write_text(path, self.text())

    @classmethod
    def from_lines(cls, lines: list[str], n_nodes: int | None = None, source: str = "input") -> PathStarData:
        """Parse lines of the paper's format; every line must be a valid G(d, l) sample of one size."""
        parsed = [parse_line(line, number, source) for number, line in enumerate(lines, 1) if line.strip()]
        if not parsed:
            raise ForethoughtError(f"{source} holds no samples")
        shape = parsed[0][0].shape
        for number, (edges, path) in enumerate(parsed, 1):
            if edges.shape != shape or len(path) != len(parsed[0][1]):
                degree, length = _degree_length(edges, path)
                raise ForethoughtError(
                    f"{source} line {number}: G({degree}, {length}) differs from line 1's "
                    f"G({_degree_length(*parsed[0])[0]}, {len(parsed[0][1])}); a file holds one graph size"
                )
        edges = np.stack([e for e, _ in parsed])
        path = np.stack([p for _, p in parsed])
        return cls.from_arrays(edges, path, n_nodes, source)

    @classmethod
    def from_arrays(cls, edges: np.ndarray, path: np.ndarray, n_nodes: int | None, source: str) -> PathStarData:
        """Parsed samples (edges [n, E, 2], paths [n, length]) → the data, its spec read from them: N at least
        their largest label + 1."""
        largest = int(max(edges.max(), path.max()))
        if n_nodes is not None and n_nodes <= largest:
            raise ForethoughtError(f"{source} uses label {largest}, not below N = {n_nodes}")
        degree, length = _degree_length(edges[0], path[0])
        return cls(PathStarSpec(degree, length, n_nodes or largest + 1), edges, path)

    @classmethod
    def from_text(cls, text: str, n_nodes: int | None = None, source: str = "input") -> PathStarData:
        """Parse a whole file's text: vectorised when every line is a valid sample of one size (~1 s for 200k
        G(5, 5, 50)); otherwise line by line (:meth:`from_lines`), which names the first bad line."""
        parsed = parse_text(text)
        if parsed is None:
            return cls.from_lines(text.splitlines(), n_nodes, source)
        edges, path = parsed
        return cls.from_arrays(edges, path, n_nodes, source)

    @classmethod
    def load(cls, path: str | Path, n_nodes: int | None = None) -> PathStarData:
        path = Path(path)
        if not path.is_file():
            raise ForethoughtError(f"path-star data file {path} does not exist")
        try:
            text = path.read_text(encoding="ascii")
        except UnicodeDecodeError as error:
            raise ForethoughtError(f"{path} is not a path-star text file (byte {error.start} is not ASCII)") from None
        return cls.from_text(text, n_nodes, source=str(path))

    # tokens -------------------------------------------------------------------------------
    def prefix_tokens(self) -> np.ndarray:
        """[n, P] numeral tokens of ``u,v|…|y,z/s,g=``."""
        spec, n = self.spec, len(self)
        tokens = np.empty((n, spec.prefix_len), dtype=np.int64)
        edge_part = np.full((n, spec.n_edges, 3), spec.pipe)
        edge_part[:, :, :2] = self.edges
        tokens[:, : 3 * spec.n_edges - 1] = edge_part.reshape(n, -1)[:, :-1]  # no | after the last edge
        tokens[:, -4:] = np.stack(
            [np.full(n, spec.slash), self.start, self.goal, np.full(n, spec.equals)], axis=1
        )
        return tokens

    def target(self, regime: str) -> np.ndarray:
        """[n, l] the emitted sequence: the path, reversed for ``reverse``."""
        return self.path[:, ::-1].copy() if check_regime(regime) == "reverse" else self.path.copy()

    def sequences(
        self, regime: str, tokenizer: PreTrainedTokenizerBase | None = None, prefix_loss: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs and labels, both [n, P + T − 1] for prefix length P and target length T: labels are
        IGNORE except at the target predictions, the first of which is made at ``=``; ``teacherless`` inputs
        hold ``$`` instead of target tokens. ``prefix_loss``: the prefix's positions predict the next prefix token
        too (the edge list itself is learned) — without it, a myopic twin's prefix positions get no gradient at
        all, since every loss they feed is a later position's.

        Numeral tokens by default; with a ``tokenizer`` (GPT-2 BPE for pretrained models) the same text
        ``a,b|…/s,g=`` + ``s,…,g`` is tokenised instead, commas included.
        """
        target = self.target(regime)
        if tokenizer is None:
            prefix, target_tokens, dollar = self.prefix_tokens(), target, self.spec.dollar
        else:
            prefixes = [line.split("=")[0] + "=" for line in self.lines()]
            targets = [",".join(str(node) for node in row) for row in target]
            prefix = _tokenize_equal_length(tokenizer, prefixes, "prefix")
            target_tokens = _tokenize_equal_length(tokenizer, targets, "target")
            dollar = tokenizer.encode("$")[0]
        full = np.concatenate([prefix, target_tokens], axis=1)  # [n, P + T]
        inputs = full[:, :-1].copy()
        if regime == "teacherless":
            inputs[:, prefix.shape[1] :] = dollar
        labels = np.full_like(inputs, IGNORE)
        labels[:, prefix.shape[1] - 1 :] = target_tokens
        if prefix_loss:
            labels[:, : prefix.shape[1] - 1] = prefix[:, 1:]
        return inputs, labels


def _tokenize_equal_length(tokenizer: PreTrainedTokenizerBase, texts: list[str], part: str) -> np.ndarray:
    ids = tokenizer(texts)["input_ids"]
    lengths = {len(row) for row in ids}
    if len(lengths) > 1:
        first = next(i for i, row in enumerate(ids) if len(row) != len(ids[0]))
        raise ForethoughtError(
            f"the tokenizer splits the {part} of sample {first + 1} into {len(ids[first])} tokens, "
            f"sample 1's into {len(ids[0])}: use labels that tokenise alike (or the numeral tokenizer)"
        )
    return np.array(ids, dtype=np.int64)


def format_line(edges: np.ndarray, path: np.ndarray) -> str:
    """One sample in the paper's text format."""
    edge_text = "|".join(f"{u},{v}" for u, v in edges)
    return f"{edge_text}/{path[0]},{path[-1]}=" + ",".join(str(v) for v in path)


_ENDINGS = (",", "|", "/", "=", "\n")  # what may follow a label in the text format


def format_text(edges: np.ndarray, path: np.ndarray) -> str:
    """:func:`format_line` of every sample, joined by (and ending with) newlines: edges [n, E, 2], path [n, l].

    Every label is written with the separator that follows it (``"7,"``, ``"7|"`` …): one table of such
    strings, a code per label of every sample, and one join."""
    n, n_edges, _ = edges.shape
    if n == 0:
        return ""
    base = int(max(edges.max(), path.max())) + 1
    comma, pipe, slash, equals, newline = (k * base for k in range(len(_ENDINGS)))  # code = label + ending offset
    edge_ends = np.full((n_edges, 2), (comma, pipe))
    edge_ends[-1, 1] = slash  # u,v|…|u,v/
    codes = np.concatenate([
        (edges + edge_ends).reshape(n, -1),
        path[:, [0]] + comma, path[:, [-1]] + equals,  # s,g=
        path[:, :-1] + comma, path[:, -1:] + newline,  # s,…,g\n
    ], axis=1)
    names = np.array([f"{label}{end}" for end in _ENDINGS for label in range(base)], dtype=object)
    return "".join(names[codes].ravel().tolist())


def parse_text(text: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Edges [n, E, 2] and paths [n, l] of a file's text, parsed and checked in bulk; None when any line is
    irregular (another layout, a blank line, a graph that is not a star …): then parse it line by line."""
    body = text[:-1] if text.endswith("\n") else text
    if not body or not body.isascii():
        return None
    first = body.split("\n", 1)[0]
    pattern = first.translate(_DIGITS)
    n_edges = pattern.count("|") + 1
    length = pattern.count(",") - n_edges  # commas: one an edge, one in the query, l − 1 in the path
    expected = ",|" * (n_edges - 1) + ",/,=" + "," * (length - 1)
    n_lines = body.count("\n") + 1
    if pattern != expected or length < 2:
        return None
    data = np.frombuffer(body.encode(), dtype=np.uint8)
    separators = np.flatnonzero((data < ord("0")) | (data > ord("9")))  # every byte that is not a digit
    layout = np.frombuffer(((expected + "\n") * n_lines)[:-1].encode(), dtype=np.uint8)
    if len(separators) != len(layout) or (data[separators] != layout).any():  # every line laid out like the first
        return None
    ends = np.append(separators, len(data)) - 1  # the last digit of each number
    digits = np.diff(np.concatenate([[-1], separators, [len(data)]])) - 1
    if digits.min() < 1 or digits.max() > 15:  # an empty field, or a label beyond int64's exact range
        return None
    values = np.zeros(len(ends), dtype=np.int64)
    for place in range(int(digits.max())):  # ones, tens, hundreds …
        present = digits > place
        values[present] += (data[ends[present] - place] - ord("0")).astype(np.int64) * 10**place
    values = values.reshape(n_lines, 2 * n_edges + 2 + length)
    edges = values[:, : 2 * n_edges].reshape(n_lines, n_edges, 2)
    query, path = values[:, 2 * n_edges : 2 * n_edges + 2], values[:, 2 * n_edges + 2 :]
    if not (query == path[:, [0, -1]]).all() or not _are_stars(edges, path):
        return None
    return edges, path


_DIGITS = str.maketrans("", "", "0123456789")


def _are_stars(edges: np.ndarray, path: np.ndarray) -> bool:
    """Whether every sample is a path-star graph with its path in it (what :func:`_check_star` checks a line at
    a time): children distinct and never the start, the start branching into arms of l − 1 unbranched edges,
    and the path start → goal along edges."""
    n, n_edges, _ = edges.shape
    arm = path.shape[1] - 1
    if n_edges % arm or n_edges // arm < 2:
        return False
    start, parents, children = path[:, 0], edges[:, :, 0], edges[:, :, 1]
    ordered = np.sort(children, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any() or (children == start[:, None]).any():
        return False
    inner = np.sort(np.where(parents == start[:, None], -1, parents), axis=1)  # the start may branch, no other node
    if ((inner[:, 1:] == inner[:, :-1]) & (inner[:, 1:] >= 0)).any():
        return False
    rows, n_labels = np.arange(n)[:, None], int(max(edges.max(), path.max())) + 1
    parent_of = np.full((n, n_labels), -1, dtype=np.int64)
    parent_of[rows, children] = parents
    has_child = np.zeros((n, n_labels), dtype=bool)
    has_child[rows, parents] = True
    is_leaf = ~has_child[rows, children]  # [n, E]
    if (is_leaf.sum(1) != n_edges // arm).any():
        return False
    node = children[is_leaf].reshape(n, -1)  # [n, d]: walk every arm back from its leaf
    for _ in range(arm):
        node = np.where(node >= 0, parent_of[rows, np.maximum(node, 0)], -1)
    if not (node == start[:, None]).all():
        return False
    return bool((parent_of[rows, path[:, 1:]] == path[:, :-1]).all())


def parse_line(line: str, number: int = 1, source: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """``a,b|c,d|…/s,g=s,…,g`` → (edges [E, 2], path [l]), checking that it is a path-star sample."""
    where = f"{source} line {number}"
    try:
        graph, rest = line.strip().split("/")
        query, target = rest.split("=")
        edges = np.array([[int(v) for v in edge.split(",")] for edge in graph.split("|")], dtype=np.int64)
        start, goal = (int(v) for v in query.split(","))
        path = np.array([int(v) for v in target.split(",")], dtype=np.int64)
    except ValueError as error:
        raise ForethoughtError(f"{where}: not of the form a,b|c,d|…/start,goal=start,…,goal ({error})") from None
    if edges.ndim != 2 or edges.shape[1] != 2:
        raise ForethoughtError(f"{where}: every edge must be two labels u,v")
    _check_star(edges, start, goal, path, where)
    return edges, path


def _degree_length(edges: np.ndarray, path: np.ndarray) -> tuple[int, int]:
    return int((edges[:, 0] == path[0]).sum()), len(path)


def _check_star(edges: np.ndarray, start: int, goal: int, path: np.ndarray, where: str) -> None:
    children = edges[:, 1]
    if len(set(children.tolist())) != len(children) or start in children:
        raise ForethoughtError(f"{where}: repeated labels (a node has two parents, or the start has one)")
    parent_of = dict(zip(children.tolist(), edges[:, 0].tolist()))
    degree = int((edges[:, 0] == start).sum())
    out_degree = np.unique(edges[:, 0], return_counts=True)
    if degree < 2 or any(c > 1 for node, c in zip(*out_degree) if node != start) or len(edges) % degree:
        raise ForethoughtError(f"{where}: not a star (the start must branch into ≥ 2 unbranched arms)")
    arm_length = len(edges) // degree
    for leaf in set(children.tolist()) - set(edges[:, 0].tolist()):
        steps, node = 0, leaf
        while node in parent_of and steps <= len(edges):
            node, steps = parent_of[node], steps + 1
        if node != start or steps != arm_length:
            raise ForethoughtError(f"{where}: not a star (arms of unequal length, or not connected to the start)")
    if path[0] != start or path[-1] != goal or len(path) != arm_length + 1:
        raise ForethoughtError(f"{where}: the path must run from the start {start} to the goal {goal}")
    if any(parent_of.get(int(child)) != int(parent) for parent, child in zip(path[:-1], path[1:])):
        raise ForethoughtError(f"{where}: the path is not in the graph")


def generate(spec: PathStarSpec, n: int, rng: np.random.Generator) -> PathStarData:
    """n random samples, vectorised: distinct labels per graph, arm 0 … d − 1 at random, edges shuffled."""
    d, arm = spec.degree, spec.length - 1
    labels = rng.random((n, spec.n_nodes)).argpartition(1 + d * arm - 1, axis=1)[:, : 1 + d * arm]
    labels = rng.permuted(labels, axis=1)  # argpartition's order is not random: shuffle it
    start, arms = labels[:, 0], labels[:, 1:].reshape(n, d, arm)
    parents = np.concatenate([np.repeat(start[:, None, None], d, axis=1), arms[:, :, :-1]], axis=2)
    edges = np.stack([parents, arms], axis=-1).reshape(n, d * arm, 2)
    edges = np.take_along_axis(edges, rng.random((n, d * arm)).argsort(axis=1)[:, :, None], axis=1)
    goal_arm = arms[np.arange(n), rng.integers(0, d, n)]  # [n, l − 1]
    return PathStarData(spec, edges, np.concatenate([start[:, None], goal_arm], axis=1))


def generate_split(spec: PathStarSpec, n_train: int, n_test: int, seed: int = 0) -> tuple[PathStarData, PathStarData]:
    """Train and test sets with no (graph, query) in both: test samples whose edge set and query occur in
    the training set are dropped and redrawn (also duplicates within the test set)."""
    rng = np.random.default_rng(seed)
    train = generate(spec, n_train, rng)
    seen = set(train.keys().tolist())
    kept: list[PathStarData] = []
    n_kept = 0
    for _ in range(100):
        candidates = generate(spec, 2 * (n_test - n_kept) + 16, rng)
        fresh = []
        for index, key in enumerate(candidates.keys().tolist()):
            if key not in seen and n_kept + len(fresh) < n_test:
                seen.add(key)
                fresh.append(index)
        kept.append(candidates.subset(np.array(fresh, dtype=np.int64)))
        n_kept += len(fresh)
        if n_kept == n_test:
            test = kept[0] if len(kept) == 1 else PathStarData(
                spec, np.concatenate([k.edges for k in kept]), np.concatenate([k.path for k in kept])
            )
            return train, test
    raise ForethoughtError(f"{spec} has too few distinct samples for {n_test} test graphs unseen in training")


class PathStarTask:
    """Training batches drawn (with replacement, from the generator) from a fixed training set."""

    def __init__(self, data: PathStarData, regime: str, prefix_loss: bool = False):
        self.data, self.regime, self.prefix_loss = data, check_regime(regime), prefix_loss
        inputs, labels = data.sequences(regime, prefix_loss=prefix_loss)
        self.inputs, self.labels = torch.from_numpy(inputs), torch.from_numpy(labels)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(self.data), (batch_size,), generator=generator, device=generator.device)
        index = index.cpu()
        return self.inputs[index].to(generator.device), self.labels[index].to(generator.device)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the target tokens (and, with ``prefix_loss``, on the prefix's next tokens)."""
        logits = model(inputs, use_cache=False).logits.float()
        return cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def describe(self) -> str:
        loss = ", loss on the prefix too" if self.prefix_loss else ""
        return f"path-star {self.data.spec}, {len(self.data)} training graphs, regime {self.regime}{loss}"
