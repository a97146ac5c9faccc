"""Typed settings of ``analysis=patching``, ``analysis=circuits`` and the ``task`` group, registered with Hydra's
ConfigStore as training's groups are (``sae/training/config.py``).

Each ``conf/analysis/<study>.yaml`` and ``conf/task/<kind>.yaml`` names its schema first in its ``defaults:`` and holds
the values (the one default of each setting); the schema gives each field its type and its meaning. A value of the
wrong type (``analysis.depth=abc``, ``task.n_pairs=abc``) then fails as Hydra composes the config, one line via
``sae.cli``. The studies receive these objects (``sae.evaluation.studies.settings_of``); their range checks
(``settings_problems``) stay, before any model loads.

Cost is counted in forward passes of the LM over a batch of prompts (patching) or contexts (circuits); a run whose
estimate exceeds ``FORWARD_PASSES_NOTICE`` says so in one line at its start, with the setting that bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

FORWARD_PASSES_NOTICE = 20_000  # batched forward passes above which a study names its cost and the setting bounding it


@dataclass
class Thresholds:
    n: int = MISSING
    """Greedy's thresholds τ, log-spaced from low to high; greedy costs about n x candidates forward passes."""
    low: float = MISSING
    """The smallest τ (un-patch a feature when the KL rises by less than τ)."""
    high: float = MISSING
    """The largest τ."""


@dataclass
class GreedySettings:
    thresholds: Thresholds = field(default_factory=Thresholds)
    """The schedule of τ (see Thresholds)."""
    seed: int = MISSING
    """The order features are visited in."""
    live_only: bool = MISSING
    """Start from the features whose codes differ between the two runs somewhere (the others cannot matter)."""
    max_candidates: int | None = MISSING
    """Greedy starts from the top n live features by attribution: it costs about thresholds.n x n forward passes
    per pair batch, method and hook (null: every live feature, thousands: hours to days on a CPU)."""
    lookahead: int = MISSING
    """Visits evaluated together in one batched forward: same result, fewer calls (try 16 on a GPU; on a CPU it only
    adds work)."""
    layers: list[str] | None = MISSING
    """The hooks greedy runs at (null: every hook studied)."""


@dataclass
class AttributionSettings:
    sizes: list[int] | None = MISSING
    """Patched-set sizes of the attribution and random curves (null: 0, then about log-spaced up to the live
    features)."""
    points: int = MISSING
    """Points of the default size grid; each costs one forward per pair batch, per curve."""


@dataclass
class PatchingSettings:
    """``analysis=patching`` (conf/analysis/patching.yaml)."""

    _target_: str = MISSING
    """The study function."""
    baselines: list[str] = MISSING
    """Baselines fitted at each hook beside the dictionaries (pca, ica, neurons, random), on baseline_tokens."""
    hooks: list[str] | None = MISSING
    """The hooks studied, e.g. [layers.3.resid] (null: every hook the dictionaries cover)."""
    batch_size: int = MISSING
    """Pairs per forward pass (pairs are grouped by token length: no padding)."""
    orders: list[str] = MISSING
    """Pair groups measured and reported apart ("all" always; IOI's ABBA and BABA, or a pairs file's own groups)."""
    select_on: str = MISSING
    """all: choose the patched sets on all pairs and measure each on every order; each: choose per order (greedy
    costs once per order)."""
    orderings: list[str] = MISSING
    """How the patched sets are chosen: attribution (one backward, then one forward per size), random (the same number
    of random live features: the control) and greedy (the paper's pruning: thresholds.n x candidates forward passes;
    opt-in)."""
    rankings: list[str] = MISSING
    """How attribution ranks features, one curve each: signed (most KL-reducing first: a feature predicted to raise
    the KL ranks last) and/or magnitude (|predicted effect|, either sign first: the earlier default)."""
    random_seed: int = MISSING
    """The random ordering's seed."""
    greedy: GreedySettings = field(default_factory=GreedySettings)
    """Greedy pruning (orderings containing greedy)."""
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    """The sizes of the attribution and random curves."""
    target_fraction: float = MISSING
    """The summary's target: the fewest features with KL <= target_fraction x the unpatched KL."""


@dataclass
class FaithfulnessSettings:
    ablation: str = MISSING
    """Features outside the circuit set to their held-out mean (mean) or to zero (zero); errors kept."""
    random_circuits: int = MISSING
    """Random circuits of the same size per layer, drawn from the live features: the control beside every circuit
    (one forward per context batch each)."""
    seed: int = MISSING
    """The random circuits' draw."""


@dataclass
class CircuitsSettings:
    """``analysis=circuits`` (conf/analysis/circuits.yaml)."""

    _target_: str = MISSING
    """The study function."""
    dictionaries: list[str] | None = MISSING
    """The dictionaries used, by name under run, one per hook (null: all of them)."""
    n_contexts: int = MISSING
    """Held-out contexts where the target's activation is in [M/2, M], M its held-out maximum (a task target uses
    the task's prompts)."""
    fan_in: int = MISSING
    """Upstream nodes kept per node."""
    depth: int | None = MISSING
    """Levels to descend (null: down to layer 0)."""
    width: int | None = MISSING
    """Most nodes kept at one layer for the next step down, by their edge weight (null: all)."""
    methods: list[str] = MISSING
    """The first picks the edges: ablation (one forward per candidate upstream feature and context batch, the paper's)
    or attribution (one backward per node and IG step); with both, the other's weight is kept on each edge."""
    candidates: int | None = MISSING
    """Ablation exactly ablates only each node's top n by attribution; null: every live feature (thousands of
    forward passes per level on a full-width dictionary)."""
    edge_sign: str = MISSING
    """both: an edge is kept by |effect| (inhibitory edges, drawn dashed, as feature-circuits selects); positive:
    only effects that raise the node."""
    topk_agreement: int = MISSING
    """Report whether attribution's top k equals ablation's, per node."""
    ig_steps: int = MISSING
    """Attribution by integrated gradients with this many steps (1: plain gradient x delta); each step is one
    backward per node."""
    error_nodes: bool = MISSING
    """Each layer's reconstruction error as a node of its own (a leaf: not descended into)."""
    min_effect: float = MISSING
    """An edge is kept only when |effect| exceeds this fraction of its node's activation."""
    batch_rows: int = MISSING
    """Contexts x ablated features per forward pass."""
    faithfulness: FaithfulnessSettings = field(default_factory=FaithfulnessSettings)
    """How the circuit is judged, against random circuits."""
    dashboard: str = MISSING
    """graph.html's links: from circuits/<target>/ to analysis=features' dashboard/."""
    explanations: str | None = MISSING
    """A directory holding autointerp/explanations.json (null: out's, when analysis=autointerp ran)."""


@dataclass
class IoiTaskSettings:
    """``task=ioi`` (conf/task/ioi.yaml): indirect-object identification as prompt pairs."""

    kind: str = MISSING
    """ioi."""
    vocabulary: str | None = MISSING
    """The IOI vocabulary JSON (templates, names, places, objects); null: sae/circuits/ioi_vocabulary.json."""
    split: str = MISSING
    """train or held_out: the vocabulary's training or held-out names (and templates)."""
    templates: str | None = MISSING
    """train or held_out, to cross them (e.g. held-out names in training templates); null: as split."""
    n_pairs: int = MISSING
    """Pairs kept (even: half ABBA, half BABA), after dropping those of unequal token length."""
    seed: int = MISSING
    """The pairs' draw."""
    prepend_bos: bool = MISSING
    """Start each prompt with BOS, as every training context does."""


@dataclass
class PairsTaskSettings:
    """``task=pairs`` (conf/task/pairs.yaml): a user's prompt pairs."""

    kind: str = MISSING
    """pairs."""
    path: str = MISSING
    """A JSONL file, one object a line: base, counterfactual, base_answer, counterfactual_answer (optional order)."""
    prepend_bos: bool = MISSING
    """Start each prompt with BOS, as every training context does."""


SCHEMAS = {
    ("analysis", "patching_schema"): PatchingSettings,
    ("analysis", "circuits_schema"): CircuitsSettings,
    ("task", "ioi_schema"): IoiTaskSettings,
    ("task", "pairs_schema"): PairsTaskSettings,
}

for (_group, _name), _node in SCHEMAS.items():
    ConfigStore.instance().store(group=_group, name=_name, node=_node)
