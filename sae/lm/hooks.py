"""Hook points: where in a transformer an activation is read, and the one hook that reads or replaces it there.

A hook point is a (layer, site) pair. Sites:

- ``resid``: the residual stream after block ``layer`` (the block's output);
- ``mlp``: the MLP's hidden neurons after the nonlinearity (the input of its down projection);
- ``mlp_out``: the MLP's output, before it is added to the residual stream;
- ``attn_out``: the attention's output (after its output projection).

Model families are one row each in ``FAMILIES``: the dotted paths of their blocks and submodules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sae.errors import ConfigError

SITES = ("resid", "mlp", "mlp_out", "attn_out")


@dataclass(frozen=True)
class Family:
    """Dotted module paths of one model family (relative to the causal-LM module and to a block)."""

    blocks: str  # list of blocks, from the causal LM
    attn: str  # attention module, from a block
    mlp: str  # MLP module, from a block
    mlp_down: str  # MLP down projection (its input is the hidden neurons), from a block
    final_norm: str  # the norm before the unembedding, from the causal LM


FAMILIES: dict[str, Family] = {
    "gpt_neox": Family(
        blocks="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
    ),
    "gpt2": Family(
        blocks="transformer.h", attn="attn", mlp="mlp", mlp_down="mlp.c_proj", final_norm="transformer.ln_f"
    ),
    "llama": Family(
        blocks="model.layers", attn="self_attn", mlp="mlp", mlp_down="mlp.down_proj", final_norm="model.norm"
    ),
    "mistral": Family(
        blocks="model.layers", attn="self_attn", mlp="mlp", mlp_down="mlp.down_proj", final_norm="model.norm"
    ),
    "qwen2": Family(
        blocks="model.layers", attn="self_attn", mlp="mlp", mlp_down="mlp.down_proj", final_norm="model.norm"
    ),
}


@dataclass(frozen=True)
class HookPoint:
    """One place to read activations: block ``layer`` (0-based) at ``site``."""

    layer: int
    site: str = "resid"

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.site}"


def family_of(model: nn.Module) -> Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model type '{model_type}' has no entry in sae.lm.hooks.FAMILIES "
            f"(known: {', '.join(FAMILIES)}); add one row with its module paths"
        )
    return FAMILIES[model_type]


def n_layers(model: nn.Module) -> int:
    return len(model.get_submodule(family_of(model).blocks))


def site_width(config, site: str) -> int:
    """Width of the activation at ``site`` for a model config (hidden size, or MLP width for ``mlp``)."""
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    if site != "mlp":
        return hidden
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return inner or 4 * hidden


def check_hook(hook: HookPoint, num_layers: int) -> None:
    """Raise ConfigError if ``hook`` cannot exist in a model with ``num_layers`` blocks."""
    if hook.site not in SITES:
        raise ConfigError(f"unknown hook.site '{hook.site}'; choose one of {', '.join(SITES)}")
    if not 0 <= hook.layer < num_layers:
        raise ConfigError(
            f"hook.layer={hook.layer} does not exist: the model has {num_layers} blocks, "
            f"so use hook.layer=0..{num_layers - 1}"
        )


def _module_and_kind(model: nn.Module, hook: HookPoint) -> tuple[nn.Module, str]:
    """The module to hook and whether its input ('pre') or output ('post') carries the activation."""
    fam = family_of(model)
    check_hook(hook, n_layers(model))
    block = model.get_submodule(fam.blocks)[hook.layer]
    if hook.site == "resid":
        return block, "post"
    if hook.site == "attn_out":
        return block.get_submodule(fam.attn), "post"
    if hook.site == "mlp_out":
        return block.get_submodule(fam.mlp), "post"
    return block.get_submodule(fam.mlp_down), "pre"


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, new: torch.Tensor):
    return (new, *value[1:]) if isinstance(value, tuple) else new


@contextlib.contextmanager
def intervene(model: nn.Module, hook: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn(activation)`` at ``hook`` during forwards; a tensor it returns replaces the activation."""
    module, kind = _module_and_kind(model, hook)
    if kind == "pre":

        def pre_hook(_module, args):
            out = fn(args[0])
            return None if out is None else (out, *args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    else:

        def post_hook(_module, _args, output):
            out = fn(_first(output))
            return None if out is None else _replace_first(output, out)

        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


def _blocks_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the list of blocks and the list's attribute name."""
    owner, _, name = family_of(model).blocks.rpartition(".")
    return model.get_submodule(owner), name


def _hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def read_block_input(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(hidden state)`` with the residual stream entering block ``layer`` during forwards."""
    check_hook(HookPoint(layer), n_layers(model))
    handle = model.get_submodule(family_of(model).blocks)[layer].register_forward_pre_hook(
        lambda _module, args, kwargs: fn(_hidden_states_arg(args, kwargs)), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def start_at_block(model: nn.Module, layer: int, state: torch.Tensor) -> Iterator[None]:
    """Forwards run blocks ``layer`` onwards only, on ``state`` (the residual stream entering block ``layer`` of
    the same input, as ``read_block_input`` gives it): the blocks below are left out of the model's list of
    blocks while inside, and block ``layer`` sees ``state`` in place of what arrives. Whether a model's forward
    allows this is ``sae.lm.splice.can_start_at_block``'s check."""
    check_hook(HookPoint(layer), n_layers(model))
    owner, name = _blocks_owner(model)
    blocks = getattr(owner, name)

    def pre_hook(_module, args, kwargs):
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

    handle = blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    setattr(owner, name, nn.ModuleList(list(blocks)[layer:]))
    try:
        yield
    finally:
        setattr(owner, name, blocks)
        handle.remove()

