"""Loading the frozen language model and its tokenizer, from the hub or a local directory."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from sae.errors import ConfigError

OFFLINE_HINT = "offline, use a local model directory and local text (the README's offline command)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _unreachable(name_or_path: str, err: Exception) -> ConfigError:
    looks_local = name_or_path.startswith((os.sep, ".", "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.exists(name_or_path):
        return ConfigError(f"model directory '{name_or_path}' does not exist; pass an existing directory or a hub id")
    return ConfigError(
        f"cannot load model '{name_or_path}' ({type(err).__name__}): the hub is unreachable or the id is wrong; "
        f"{OFFLINE_HINT}"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection; False in offline mode.

    Checked before a hub download so that an offline machine fails at once instead of after the hub client's
    retries (about 45 s of them)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_config(name_or_path: str) -> PretrainedConfig:
    """The model's config (cheap: no weights), for validating hooks before any heavy work."""
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)  # a local dir or the hub cache
    except (OSError, ValueError) as err:
        if os.path.isdir(name_or_path) or not hub_reachable():
            raise _unreachable(name_or_path, err) from None
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _unreachable(name_or_path, err) from None


def check_context_length(context_length: int, config: PretrainedConfig, key: str = "data.context_length") -> None:
    """Raise ConfigError if contexts of ``context_length`` tokens are longer than the model takes."""
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if longest is not None and context_length > longest:
        raise ConfigError(
            f"{key}={context_length} is longer than the model's {longest} positions: use at most {longest}"
        )


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown model.dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu") -> torch.nn.Module:
    """The causal LM in eval mode with gradients off."""
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as err:
        raise _unreachable(name_or_path, err) from None
    model.eval().requires_grad_(False)
    return model.to(device)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _unreachable(name_or_path, err) from None


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_label(name_or_path: str) -> str:
    """The model's name as figures and tables show it (the directory's or hub id's last part); the project's
    stand-in models (a directory under ``fixtures/``) say so: ``neox-ioi-14m (stand-in)``."""
    path = Path(str(name_or_path))
    return f"{path.name} (stand-in)" if "fixtures" in path.parts else path.name
