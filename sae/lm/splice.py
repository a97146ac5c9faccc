"""The spliced forward: the LM run once with an edit of the activation at some hooks.

Every intervention of the project goes through ``spliced_forward``: the held-out metrics (reconstruction, zero and
mean ablation spliced in), the causal logit effects of a feature, feature patching, circuit ablations and the KL
training objective. An edit sees the activation arriving at its hook (after every upstream edit) and the mask of
ordinary-text positions, and returns the activation the rest of the model sees; edits change ordinary-text
positions only (BOS, EOS and padding keep the model's own, as in training).

Gradients follow the caller: under ``torch.no_grad()`` nothing is recorded; with autograd on, gradients flow
through the frozen later blocks into whatever the edits used (a dictionary's parameters, codes given to a patch).

Edits in model units (a dictionary's ``encode``/``decode`` apply its normalisation themselves):

- ``Reconstruct(d)``: ``x -> decode(encode(x))``;
- ``PatchCodes(d, features, codes)``: ``x -> x + Σ_{j∈F} (codes_j − c_j) · d_j`` with ``c = encode(x)`` and ``d_j``
  the atoms in model units: the error ``x − decode(c)`` is kept, so patching no feature leaves ``x`` exactly;
- ``Ablate(d, features)``: ``x -> x − Σ_{j∈F} c_j · d_j`` (the error and the other features kept): ``PatchCodes``
  with the codes of ``features`` set to zero;
- ``AddDelta(delta)``, ``Replace(values)``: a given change, or given values (zeros, a mean) at ordinary positions.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sae.dictionaries import Dictionary
from sae.lm.hooks import HookPoint, intervene, read_block_input, start_at_block
from sae.lm.reader import model_device, token_mask

Edit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (activation [b, s, w], keep [b, s]) -> activation


def _at_ordinary(keep: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(keep.unsqueeze(-1), new.to(old.dtype), old)


def _as_dictionary_input(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dictionary's dtype (a bf16 LM's activation meets a float32 dictionary)."""
    return x.to(dictionary.b_dec.dtype)


def atoms_in_model_units(dictionary: Dictionary) -> torch.Tensor:
    """``[n_features, d_in]``: what one unit of each code adds to the activation."""
    return dictionary.decoder_weight() * dictionary.scale


def feature_mask(features: torch.Tensor | Sequence[int], n_features: int, device: torch.device) -> torch.Tensor:
    """A float ``[n_features]`` 0/1 mask from a boolean mask or a list of indices."""
    features = torch.as_tensor(features, device=device)
    if features.dtype == torch.bool:
        return features.float()
    return torch.zeros(n_features, device=device).index_fill_(0, features.long(), 1.0)


@dataclass
class Reconstruct:
    """The dictionary's reconstruction in place of the activation."""

    dictionary: Dictionary

    def __call__(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return _at_ordinary(keep, self.dictionary(_as_dictionary_input(self.dictionary, x)), x)


@dataclass
class PatchCodes:
    """Set the codes of ``features`` to ``codes`` (``[batch, seq, n_features]``, e.g. another input's), keeping
    this input's reconstruction error and its other codes. ``base_codes`` holds the codes it found (``c``)."""

    dictionary: Dictionary
    features: torch.Tensor | Sequence[int]
    codes: torch.Tensor
    base_codes: torch.Tensor | None = field(default=None, repr=False)

    def __call__(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        d, x_in = self.dictionary, _as_dictionary_input(self.dictionary, x)
        self.base_codes = d.encode(x_in)
        mask = feature_mask(self.features, d.n_features, x.device).to(x_in.dtype)
        delta = ((self.codes.to(self.base_codes) - self.base_codes) * mask) @ atoms_in_model_units(d)
        return _at_ordinary(keep, x_in + delta, x)


@dataclass
class Ablate(PatchCodes):
    """Remove the contribution ``c_j · d_j`` of each of ``features``: their codes patched to zero (``PatchCodes``);
    the error and every other code stay. ``base_codes`` holds the codes it found."""

    codes: torch.Tensor = field(default_factory=lambda: torch.zeros(()))


@dataclass
class AddDelta:
    """Add ``delta`` (broadcastable to the activation) at ordinary positions."""

    delta: torch.Tensor

    def __call__(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return _at_ordinary(keep, x + self.delta.to(x), x)


@dataclass
class Replace:
    """``values`` (broadcastable to the activation: zeros, a mean activation, another run's) at ordinary positions."""

    values: torch.Tensor

    def __call__(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return _at_ordinary(keep, self.values.to(x).expand_as(x), x)


@dataclass
class Spliced:
    """What a spliced forward returns: next-token ``logits`` (``[batch, seq, vocab]``, or ``[n, vocab]`` at the
    positions asked for; ``None`` when the final hidden states were asked for instead, in ``hidden``) and the
    activation that arrived at each hook asked for (before that hook's own edit)."""

    logits: torch.Tensor | None
    activations: dict[HookPoint, torch.Tensor]
    hidden: torch.Tensor | None = None
    prefix: Prefix | None = None


@dataclass
class Prefix:
    """The residual stream ``state`` entering block ``layer`` in a forward on some input: what a later spliced
    forward on the same input whose edits all sit at block ``layer`` or above starts from, instead of running
    the embeddings and the blocks below again (the held-out metrics' clean run gives it to their spliced and
    ablated runs)."""

    layer: int
    state: torch.Tensor


def spliced_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    edits: Mapping[HookPoint, Edit],
    special_ids: list[int],
    read: Sequence[HookPoint] = (),
    at: tuple[torch.Tensor, torch.Tensor] | None = None,
    hidden: bool = False,
    keep_prefix: int | None = None,
    prefix: Prefix | None = None,
) -> Spliced:
    """Run ``model`` on ``input_ids`` once with each ``edits[hook]`` applied at its hook.

    ``read``: hooks whose arriving activation is returned. ``at``: ``(rows, positions)`` to unembed only those
    positions (the final hidden states are gathered first, sparing the vocabulary-wide product elsewhere).
    ``hidden``: return the final hidden states (what the unembedding reads) and no logits, for a caller that
    unembeds them itself (``sae.evaluation.metrics.kl_from_hidden``, with ``linear_unembedding``).
    ``keep_prefix``: a block; ``Spliced.prefix`` is then the residual stream entering it (``None`` where the model
    cannot start a forward there: ``can_start_at_block``). ``prefix``: such a state of an earlier forward on the same
    ``input_ids`` (under the same edits below its block, usually none): the forward starts at its block; every hook
    of ``edits`` and ``read`` must sit at that block or above."""
    input_ids = input_ids.to(model_device(model))
    if prefix is not None and any(hook.layer < prefix.layer for hook in [*edits, *read]):
        raise ValueError(f"a forward starting at block {prefix.layer} cannot edit or read a hook below it")
    keep = token_mask(input_ids, special_ids)
    seen: dict[HookPoint, torch.Tensor] = {}

    def at_hook(hook: HookPoint):
        def fn(x: torch.Tensor) -> torch.Tensor | None:
            if hook in read:
                seen[hook] = x
            return edits[hook](x, keep) if hook in edits else None

        return fn

    kept: list[Prefix] = []
    keep_prefix = keep_prefix if keep_prefix is not None and can_start_at_block(model, keep_prefix) else None
    with contextlib.ExitStack() as stack:
        for hook in dict.fromkeys([*edits, *read]):
            stack.enter_context(intervene(model, hook, at_hook(hook)))
        if keep_prefix is not None:
            stack.enter_context(read_block_input(model, keep_prefix, lambda x: kept.append(Prefix(keep_prefix, x))))
        if prefix is not None:  # after the hooks above: they find their blocks by index in the full list
            stack.enter_context(start_at_block(model, prefix.layer, prefix.state))
        if at is None and not hidden:
            return Spliced(model(input_ids=input_ids, use_cache=False).logits, seen, prefix=_last(kept))
        states = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    if hidden:
        return Spliced(None, seen, states, _last(kept))
    rows, positions = (t.to(states.device) for t in at)
    return Spliced(model.get_output_embeddings()(states[rows, positions]), seen, prefix=_last(kept))


def _last(kept: list[Prefix]) -> Prefix | None:
    return kept[-1] if kept else None


_STARTS: weakref.WeakKeyDictionary[nn.Module, dict[int, bool]] = weakref.WeakKeyDictionary()


def can_start_at_block(model: nn.Module, layer: int) -> bool:
    """Whether a forward started at block ``layer`` from the residual stream entering it (``start_at_block``)
    gives the final hidden states of the whole forward (checked once per model and block, on a short input): a
    model whose forward indexes its blocks by position, or feeds them anything but the residual stream and what
    it computes from the input's shape, must run whole."""
    starts = _STARTS.setdefault(model, {})
    if layer not in starts:
        ids = torch.arange(8, device=model_device(model))[None] % model.config.vocab_size
        seen: list[torch.Tensor] = []
        with torch.no_grad():
            with read_block_input(model, layer, seen.append):
                whole = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            try:
                with start_at_block(model, layer, seen[0]):
                    started = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                starts[layer] = torch.allclose(started, whole, rtol=1e-5, atol=1e-5)
            except (TypeError, IndexError, KeyError, RuntimeError):
                starts[layer] = False
    return starts[layer]


_UNEMBEDDINGS: weakref.WeakKeyDictionary[nn.Module, tuple | None] = weakref.WeakKeyDictionary()


def linear_unembedding(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The unembedding's ``(weight, bias)`` when the model's logits are exactly ``F.linear`` of its final hidden
    states (checked once per model, on a short input), else ``None``: a head that soft-caps or scales its logits
    must be run as the model runs it."""
    if model in _UNEMBEDDINGS:
        return _UNEMBEDDINGS[model]
    head, found = model.get_output_embeddings(), None
    if isinstance(head, nn.Linear):
        ids = torch.arange(8, device=model_device(model))[None] % model.config.vocab_size
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            states = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            if torch.allclose(F.linear(states, head.weight, head.bias).float(), logits.float(), rtol=1e-5, atol=1e-5):
                found = (head.weight, head.bias)
    _UNEMBEDDINGS[model] = found
    return found
