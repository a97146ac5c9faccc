"""Circuit discovery over dictionary features: which features of the layer below move a node, found by ablating
them one at a time (the paper's way) or by attribution (one backward pass per node), recursively down the layers.

A *level* is one hook with its dictionary (or the output, for a task's metric); the target is read on the chosen
contexts at one position per context (``Contexts.positions``), and so is every node below it, so that an edge says
how much an upstream feature, removed at every position, moves its downstream node at the position that matters.

- **Ablation** of feature ``j`` at hook ``u``: ``x_u -> x_u − c_j · d_j`` at every ordinary position through the
  splice (``Ablate``; the reconstruction error stays); the edge weight is the mean drop of the node, clean minus
  ablated. One forward per upstream feature gives the drop of *every* node of the level above at once, so a level
  costs one forward per live upstream feature however many nodes it has. Ablating the error node is
  ``Reconstruct`` (``x_u -> x_u − e_u``).
- **Attribution**: the drop estimated as ``Σ_pos ∇_{x_u} v · c_j d_j`` (gradient × (clean − ablated)), and
  ``Σ_pos ∇_{x_u} v · e_u`` for the error node, from one backward pass per node. With ``ig_steps = s > 1`` the
  gradient is averaged over ``x_α = b + α (x_u − b)``, ``α = 1/s, 2/s, …, 1``, the path from every feature and the
  error removed (``b`` the decoder's bias, the dictionary's reconstruction of nothing) to the clean activation:
  integrated gradients. ``s = 1`` is the plain gradient at the clean run.

Only *live* upstream features (non-zero somewhere at or before a read position on the contexts) are scored: the
others cannot move anything. The first of ``methods`` picks each node's ``fan_in`` upstream features (those whose
effect is above ``min_effect`` times the node's activation: by ``|effect|`` with ``edge_sign=both``, the default, so
inhibitory edges are kept; only raising effects with ``edge_sign=positive``); the other method's weight on the same
edges is kept
beside it, and each level records how well the two rankings agree (Spearman, and whether the top ``k`` are the same
set) over the features ablated exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sae.circuits.graph import CircuitGraph, error_id, feature_id
from sae.circuits.scores import same_top_k, spearman
from sae.dictionaries import Dictionary
from sae.errors import ConfigError
from sae.lm.hooks import HookPoint, intervene
from sae.lm.splice import Ablate, Edit, Reconstruct, atoms_in_model_units, spliced_forward

METHODS = ("ablation", "attribution")


class _Arrived(Exception):
    """Raised at the hook a level is read at: the rest of the forward is not needed."""


@dataclass
class Contexts:
    """One batch of contexts (no padding), the position each is read at, and for a task the two answers whose
    logit difference is the output (``good`` minus ``bad``)."""

    ids: torch.Tensor  # [b, T] long
    positions: torch.Tensor  # [b] long
    good: torch.Tensor | None = None  # [b] long
    bad: torch.Tensor | None = None  # [b] long

    def repeat(self, k: int) -> Contexts:
        """The batch stacked ``k`` times (row ``r`` is copy ``r // b`` of context ``r % b``)."""
        rep = (lambda t: None if t is None else t.repeat(k)) if k > 1 else (lambda t: t)
        return Contexts(
            self.ids.repeat(k, 1) if k > 1 else self.ids, rep(self.positions), rep(self.good), rep(self.bad)
        )

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Level:
    """A hook with its dictionary (``name``: the dashboard's folder for it), or the output (``hook`` None)."""

    hook: HookPoint | None
    dictionary: Dictionary | None
    name: str
    layer: int

    @property
    def label(self) -> str:
        return self.hook.name if self.hook is not None else "output"


EDGE_SIGNS = ("both", "positive")


@dataclass(frozen=True)
class DiscoverySettings:
    """``analysis.*`` of ``conf/analysis/circuits.yaml`` that shape the graph (``sae.circuits.config.CircuitsSettings``;
    their one default is in the YAML)."""

    fan_in: int
    methods: tuple[str, ...]
    candidates: int | None
    topk_agreement: int
    ig_steps: int
    error_nodes: bool
    min_effect: float
    width: int | None
    batch_rows: int
    edge_sign: str = "both"

    @classmethod
    def from_settings(cls, s) -> DiscoverySettings:
        """From a ``CircuitsSettings``; one ConfigError naming every setting out of range."""
        problems = []
        if not s.methods or any(m not in METHODS for m in s.methods) or len(set(s.methods)) != len(s.methods):
            problems.append(f"analysis.methods={list(s.methods)} must be a non-empty list of distinct {list(METHODS)}")
        for key in ("fan_in", "topk_agreement", "ig_steps", "batch_rows"):
            if getattr(s, key) < 1:
                problems.append(f"analysis.{key}={getattr(s, key)} must be an integer >= 1")
        for key in ("candidates", "width"):
            if getattr(s, key) is not None and getattr(s, key) < 1:
                problems.append(f"analysis.{key}={getattr(s, key)} must be an integer >= 1 (or null: all)")
        if s.min_effect < 0:
            problems.append(f"analysis.min_effect={s.min_effect} must be a number >= 0")
        if s.edge_sign not in EDGE_SIGNS:
            problems.append(f"analysis.edge_sign={s.edge_sign!r} must be one of {list(EDGE_SIGNS)}")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(s.fan_in, tuple(s.methods), s.candidates, s.topk_agreement, s.ig_steps, s.error_nodes,
                   float(s.min_effect), s.width, s.batch_rows, s.edge_sign)

    def forward_passes(self, n_contexts: int, candidates: int, nodes: int = 1) -> int:
        """About how many forward (or backward) passes one step down costs with ``candidates`` live upstream features
        and ``nodes`` nodes: ablation one per ``batch_rows // contexts`` candidates per batch of contexts,
        attribution one per node and IG step per batch."""
        batches = max(1, math.ceil(n_contexts / self.batch_rows))
        per_batch = max(1, self.batch_rows // max(1, min(n_contexts, self.batch_rows)))
        ablated = min(candidates, self.candidates * nodes if self.candidates is not None else candidates)
        cost = batches * math.ceil(ablated / per_batch) if "ablation" in self.methods else 0
        if "attribution" in self.methods or self.candidates is not None:
            cost += batches * self.ig_steps * nodes
        return cost

    @property
    def primary(self) -> str:
        return self.methods[0]

    @property
    def attribution_name(self) -> str:
        return "attribution" if self.ig_steps == 1 else "integrated_gradients"


@dataclass
class _Interpolated:
    """``x -> b + α (x − b) + δ`` at ordinary positions, ``δ = 0`` a leaf whose gradient is ``∇_x v`` at ``x_α``;
    ``x`` and the codes of the arriving activation are kept for the attribution."""

    dictionary: Dictionary
    alpha: float
    delta: torch.Tensor | None = None
    x: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        d = self.dictionary
        self.x = x.detach().to(d.b_dec.dtype)
        base = d.decode(torch.zeros(1, d.n_features, device=x.device, dtype=self.x.dtype))[0]
        self.delta = torch.zeros_like(self.x, requires_grad=True)
        moved = base + self.alpha * (self.x - base) + self.delta
        return torch.where(keep.unsqueeze(-1), moved.to(x.dtype), x)


class CircuitProblem:
    """The model, the contexts and how a level's nodes are read under any edits."""

    def __init__(
        self, model: nn.Module, special_ids: Sequence[int], contexts: Sequence[Contexts], batch_rows: int = 64
    ):
        if not contexts or not sum(len(c) for c in contexts):
            raise ConfigError("no contexts to find a circuit on")
        self.model, self.special_ids, self.batch_rows = model, list(special_ids), batch_rows
        self.device = next(model.parameters()).device
        self.contexts = [Contexts(*(None if t is None else t.to(self.device) for t in
                                    (c.ids, c.positions, c.good, c.bad))) for c in contexts]
        self.n = sum(len(c) for c in self.contexts)
        self._clean: dict[HookPoint, list[torch.Tensor]] = {}

    # ---------------------------------------------------------------- reading

    def read(
        self, level: Level, indices: Sequence[int], batch: Contexts, edits: Mapping[HookPoint, Edit]
    ) -> torch.Tensor:
        """``[b, m]``: the nodes ``indices`` of ``level`` (or the output's logit difference, ``m = 1``) per row.

        A feature level's forward stops at its hook (the blocks above cannot change what is read there)."""
        rows = torch.arange(len(batch), device=self.device)
        if level.hook is None:
            logits = spliced_forward(
                self.model, batch.ids, edits, self.special_ids, at=(rows, batch.positions)
            ).logits.float()
            return (logits[rows, batch.good] - logits[rows, batch.bad]).unsqueeze(-1)
        x = self._arriving(level.hook, batch, edits)[rows, batch.positions]
        codes = level.dictionary.encode(x.to(level.dictionary.b_dec.dtype))
        return codes[:, list(indices)].float()

    def _arriving(self, hook: HookPoint, batch: Contexts, edits: Mapping[HookPoint, Edit]) -> torch.Tensor:
        """The activation arriving at ``hook`` (``[b, T, w]``) in the spliced forward with ``edits``, stopping there."""
        seen: dict[str, torch.Tensor] = {}

        def grab(x: torch.Tensor) -> None:
            seen["x"] = x
            raise _Arrived

        with intervene(self.model, hook, grab):  # registered first: runs before the splice's own hook at ``hook``
            try:
                spliced_forward(self.model, batch.ids, {h: e for h, e in edits.items() if h != hook}, self.special_ids)
            except _Arrived:
                pass
        return seen["x"]

    @torch.no_grad()
    def mean_value(self, level: Level, indices: Sequence[int],
                   edits: Callable[[Contexts], Mapping[HookPoint, Edit]] = lambda batch: {}) -> torch.Tensor:
        """``[m]``: the nodes' mean over every context, with ``edits(batch)`` applied."""
        total = sum(self.read(level, indices, batch, edits(batch)).sum(0) for batch in self.contexts)
        return total / self.n

    @torch.no_grad()
    def clean_codes(self, level: Level) -> list[torch.Tensor]:
        """Per batch ``[b, T, n]``: the codes of the untouched run at ``level``'s hook (cached)."""
        if level.hook not in self._clean:
            parts = []
            for batch in self.contexts:
                x = self._arriving(level.hook, batch, {})
                parts.append(level.dictionary.encode(x.to(level.dictionary.b_dec.dtype)))
            self._clean[level.hook] = parts
        return self._clean[level.hook]

    def _up_to_read(self, batch: Contexts) -> torch.Tensor:
        """``[b, T]``: positions at or before each row's read position (the only ones that can move it)."""
        return torch.arange(batch.ids.shape[1], device=self.device)[None] <= batch.positions[:, None]

    def live(self, level: Level) -> torch.Tensor:
        """``[n_features]`` bool: features non-zero at some position up to a read position."""
        fired = [(c.abs() * self._up_to_read(b).unsqueeze(-1)).amax((0, 1)) > 0
                 for c, b in zip(self.clean_codes(level), self.contexts)]
        return torch.stack(fired).any(0)

    def activation(self, level: Level, indices: Sequence[int]) -> torch.Tensor:
        """``[m]``: clean mean codes at the read positions."""
        parts = [c[torch.arange(len(b), device=self.device), b.positions][:, list(indices)].sum(0)
                 for c, b in zip(self.clean_codes(level), self.contexts)]
        return torch.stack(parts).sum(0).float() / self.n

    @torch.no_grad()
    def error_norm(self, level: Level) -> float:
        """Mean ``||x − decode(encode(x))||`` at the read positions: an error node's activation."""
        d, total = level.dictionary, 0.0
        for batch in self.contexts:
            x = self._arriving(level.hook, batch, {})[torch.arange(len(batch), device=self.device), batch.positions]
            x = x.to(d.b_dec.dtype)
            total += float((x - d(x)).norm(dim=-1).sum())
        return total / self.n

    # ---------------------------------------------------------------- edges

    @torch.no_grad()
    def ablation(self, level: Level, indices: Sequence[int], upstream: Level, candidates: torch.Tensor,
                 error: bool = True, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``([m, len(candidates)], [m] or None)``: the mean drop of each node when each candidate (then the error)
        is ablated at ``upstream``'s hook, at every position."""
        d, n_features = upstream.dictionary, upstream.dictionary.n_features
        m = len(indices) if level.hook is not None else 1
        drops = torch.zeros(m, len(candidates), device=self.device)
        error_drop = torch.zeros(m, device=self.device) if error else None
        for batch in self.contexts:
            clean = self.read(level, indices, batch, {}).sum(0)
            if error:
                error_drop += clean - self.read(level, indices, batch, {upstream.hook: Reconstruct(d)}).sum(0)
            k = max(1, self.batch_rows // len(batch))
            for start in tqdm(range(0, len(candidates), k), desc=desc, disable=desc is None, mininterval=5):
                chosen = candidates[start:start + k].to(self.device)
                masks = torch.zeros(len(chosen), n_features, dtype=torch.bool, device=self.device)
                masks[torch.arange(len(chosen), device=self.device), chosen] = True
                edit = Ablate(d, masks.repeat_interleave(len(batch), 0).unsqueeze(1))
                values = self.read(level, indices, batch.repeat(len(chosen)), {upstream.hook: edit})
                drops[:, start:start + len(chosen)] += (clean[None] - values.view(len(chosen), len(batch), -1).sum(1)).T
        return drops / self.n, None if error_drop is None else error_drop / self.n

    def attribution(self, level: Level, indices: Sequence[int], upstream: Level, steps: int,
                    desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``([m, n_features], [m])``: each node's attribution to every upstream feature and to the error."""
        d = upstream.dictionary
        atoms = atoms_in_model_units(d).detach()
        m = len(indices) if level.hook is not None else 1
        scores = torch.zeros(m, d.n_features, device=self.device)
        errors = torch.zeros(m, device=self.device)
        work = [(batch, alpha) for batch in self.contexts for alpha in [(s + 1) / steps for s in range(steps)]]
        for batch, alpha in tqdm(work, desc=desc, disable=desc is None, mininterval=5):
            edit = _Interpolated(d, alpha)
            with torch.enable_grad():
                values = self.read(level, indices, batch, {upstream.hook: edit})
                with torch.no_grad():
                    codes = d.encode(edit.x)
                    error = edit.x - d.decode(codes)
                for q in range(m):
                    grad, = torch.autograd.grad(values[:, q].sum(), edit.delta, retain_graph=q < m - 1)
                    with torch.no_grad():
                        scores[q] += ((grad @ atoms.T) * codes).sum((0, 1)) / steps
                        errors[q] += (grad * error).sum() / steps
        return scores / self.n, errors / self.n


# ---------------------------------------------------------------------------------------------------- recursion


@dataclass
class LevelReport:
    """What one step down found: how many upstream features were live and ablated, the agreement of the two
    rankings per node, and the wall time of each method."""

    hook: str
    nodes: int
    live: int
    ablated: int
    spearman: list[float] = field(default_factory=list)
    topk_agree: list[bool] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Wall and CPU seconds of one method (the CPU time stays meaningful when other jobs share the machine)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self, into: dict, method: str) -> None:
        into[method] = round(time.perf_counter() - self.wall, 2)
        into[f"{method}_cpu"] = round(time.process_time() - self.cpu, 2)


def _keep(
    scores: torch.Tensor, features: torch.Tensor, activation: float, settings: DiscoverySettings
) -> list[tuple[int, float]]:
    """The top ``fan_in`` ``(feature, score)`` among ``features`` by the edge's strength, kept when it is above
    ``min_effect · |activation|``: strength ``|score|`` with ``edge_sign=both`` (an inhibitory edge, negative, counts
    as much as an excitatory one, as feature-circuits selects), ``score`` itself with ``positive``."""
    strength = scores.abs() if settings.edge_sign == "both" else scores
    order = torch.argsort(strength, descending=True, stable=True)[: settings.fan_in]
    floor = settings.min_effect * abs(activation)
    return [(int(features[i]), float(scores[i])) for i in order if float(strength[i]) > max(floor, 0.0)]


def _candidates(live: torch.Tensor, attribution: torch.Tensor, settings: DiscoverySettings) -> torch.Tensor:
    """The live features to ablate: all of them, or the union of each node's top ``candidates`` by attribution."""
    features = live.nonzero().squeeze(-1)
    if settings.candidates is None or settings.candidates >= len(features):
        return features
    strength = attribution[:, features].abs() if settings.edge_sign == "both" else attribution[:, features]
    top = strength.topk(settings.candidates, dim=1).indices
    return features[torch.unique(top)]


def _agreement(attribution: torch.Tensor, ablation: torch.Tensor, k: int) -> tuple[float, bool]:
    return spearman(attribution.cpu(), ablation.cpu()), same_top_k(attribution, ablation, min(k, len(ablation)))


def _step(
    problem: CircuitProblem,
    level: Level,
    frontier: list[int],
    upstream: Level,
    settings: DiscoverySettings,
    log: Callable[[str], None],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None], torch.Tensor, LevelReport]:
    """Both methods' scores of every live upstream feature (``{method: [m, n_candidates]}``) and of the error."""
    live = problem.live(upstream)
    report = LevelReport(upstream.label, len(frontier), int(live.sum()), 0)
    scores, errors = {}, {}
    need_attribution = "attribution" in settings.methods or settings.candidates is not None
    if need_attribution:
        clock = _Clock()
        full, errors["attribution"] = problem.attribution(level, frontier, upstream, settings.ig_steps,
                                                          desc=f"attribution {upstream.label}")
        clock.stop(report.seconds, "attribution")
    features = _candidates(live, full, settings) if need_attribution and "ablation" in settings.methods else \
        live.nonzero().squeeze(-1)
    if need_attribution:
        scores["attribution"] = full[:, features]
    if "ablation" in settings.methods:
        clock = _Clock()
        scores["ablation"], errors["ablation"] = problem.ablation(
            level,
            frontier,
            upstream,
            features,
            settings.error_nodes,
            desc=f"ablation {upstream.label} ({len(features)} features)",
        )
        clock.stop(report.seconds, "ablation")
        report.ablated = len(features)
        if need_attribution:
            for q in range(scores["ablation"].shape[0]):
                rho, agree = _agreement(scores["attribution"][q], scores["ablation"][q], settings.topk_agreement)
                report.spearman.append(rho)
                report.topk_agree.append(agree)
    log(f"circuits: {upstream.label}: {report.live} live features, {report.ablated} ablated; {report.seconds}")
    return scores, errors, features, report


def _edge_method(method: str, settings: DiscoverySettings) -> str:
    return settings.attribution_name if method == "attribution" else method


def discover(problem: CircuitProblem, levels: Sequence[Level], target_index: int | None, settings: DiscoverySettings,
             graph: CircuitGraph, log: Callable[[str], None] = lambda message: None) -> list[LevelReport]:
    """Grow ``graph`` from the target (``levels[0]``, feature ``target_index``; None for the output) down through
    ``levels[1:]``; returns one report per step down."""
    top = levels[0]
    frontier = [target_index] if top.hook is not None else [0]
    ids = [feature_id(top.label, target_index) if top.hook is not None else graph_output_id(graph)]
    reports = []
    for level, upstream in zip(levels, levels[1:]):
        if not frontier:
            break
        activations = problem.activation(level, frontier).tolist() if level.hook is not None else \
            [graph.nodes[ids[0]].activation]
        scores, errors, features, report = _step(problem, level, frontier, upstream, settings, log)
        reports.append(report)
        up_activation = problem.activation(upstream, features.tolist()) if len(features) else torch.zeros(0)
        kept: dict[int, float] = {}  # the strength of each kept feature's strongest edge (the next frontier's order)
        effect: dict[int, float] = {}
        if settings.error_nodes:
            graph.add_error(upstream.label, upstream.layer, upstream.name, activation=problem.error_norm(upstream))
        for q, node in enumerate(ids):
            for j, weight in _keep(scores[settings.primary][q], features, activations[q], settings):
                where = int((features == j).nonzero())
                graph.add_feature(
                    upstream.label, upstream.layer, j, upstream.name, activation=float(up_activation[where])
                )
                strength = abs(weight) if settings.edge_sign == "both" else weight
                if strength > kept.get(j, -math.inf):
                    kept[j], effect[j] = strength, weight
                for method, values in scores.items():
                    graph.add_edge(
                        feature_id(upstream.label, j), node, float(values[q, where]), _edge_method(method, settings)
                    )
            for method, values in errors.items():
                if settings.error_nodes and values is not None:
                    graph.add_edge(error_id(upstream.label), node, float(values[q]), _edge_method(method, settings))
        if settings.error_nodes and errors.get(settings.primary) is not None:  # its largest edge, by magnitude
            values = errors[settings.primary]
            graph.nodes[error_id(upstream.label)].effect = float(values[values.abs().argmax()])
        for j, weight in kept.items():
            graph.nodes[feature_id(upstream.label, j)].effect = effect[j]  # its strongest edge's, signed
        order = sorted(kept, key=lambda j: -kept[j])
        frontier = order[: settings.width] if settings.width else order
        ids = [feature_id(upstream.label, j) for j in frontier]
    return reports


def graph_output_id(graph: CircuitGraph) -> str:
    """The id of the output node of a task circuit (the one node of kind ``output``)."""
    return next(n.id for n in graph.nodes.values() if n.kind == "output")
