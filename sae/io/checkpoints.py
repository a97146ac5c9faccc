"""Files a run writes while it trains: checksummed atomic Lightning checkpoints, the status file that says how the
run ended, and the rules for starting or resuming a run in a directory."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from sae.dictionaries import build
from sae.errors import ConfigError
from sae.io.atomic import atomic_path, write_json, write_text

STATUS = "status.json"
SETTINGS = "train_settings.json"  # the training settings a fresh run started with, checked when it is resumed
LAST = Path("checkpoints") / "last.ckpt"
DIGEST = ".sha256"  # suffix of a checkpoint's checksum file


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digests(path: str | Path) -> list[str]:
    file = Path(f"{path}{DIGEST}")
    return file.read_text().split() if file.is_file() else []


def _write_digests(path: str | Path, digests: list[str]) -> None:
    write_text(f"{path}{DIGEST}", "\n".join(digests) + "\n")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary name and renamed, so a kill never leaves half a checkpoint,
    each with a ``<name>.sha256`` beside it that is checked before the checkpoint is loaded.

    While the new file is renamed into place the checksum file lists both the old and the new digest, so a kill at
    any moment leaves a pair that verifies."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            new = sha256_of(tmp)
            _write_digests(path, [new, *_digests(path)])
        _write_digests(path, [new])

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        verify_checkpoint(path)
        location = {} if map_location is None else {"map_location": map_location}
        try:  # tensors and plain containers only, whatever the caller asks: loading a checkpoint never runs code
            return super().load_checkpoint(path, **location, weights_only=True)
        except Exception as err:
            raise ConfigError(f"{_corrupted(path)} ({type(err).__name__}: {err})".replace("\n", " ")) from err

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        Path(f"{path}{DIGEST}").unlink(missing_ok=True)


def _corrupted(path: str | Path) -> str:
    return (f"checkpoint {path} is corrupted: delete the run directory (or choose a new hydra.run.dir) and train "
            "again without resume=true")


def verify_checkpoint(path: str | Path) -> None:
    """Raise ConfigError unless ``path``'s sha256 is one its checksum file lists."""
    if not _digests(path):
        raise ConfigError(f"{_corrupted(path)} (its checksum file {path}{DIGEST} is missing)")
    if sha256_of(path) not in _digests(path):
        raise ConfigError(f"{_corrupted(path)} (its sha256 does not match {path}{DIGEST})")


def write_status(run_dir: str | Path, state: str, **extra) -> None:
    """Record ``state`` (``running``, ``finished`` or ``failed``) in ``<run_dir>/status.json``."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(run_dir) / STATUS, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def read_status(run_dir: str | Path) -> str | None:
    """The state ``status.json`` records, or None when there is none."""
    path = Path(run_dir) / STATUS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["state"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path} is corrupt (no JSON object with a 'state'): delete the run directory (or choose a "
                          "new hydra.run.dir) and train again") from None


def resume_checkpoint(run_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint a run in ``run_dir`` continues from (None: a fresh start), after checking that the directory
    and ``resume`` agree: a fresh run needs a directory that holds no run, a resumed one an unfinished run with a
    sound ``checkpoints/last.ckpt``."""
    run_dir = Path(run_dir)
    status, last = read_status(run_dir), run_dir / LAST
    if not resume:
        if status is not None or last.exists():
            raise ConfigError(
                f"{run_dir} already holds a run (status: {status or 'unknown'}): add resume=true to continue it, or "
                "choose a new hydra.run.dir (or delete this one) to start over"
            )
        return None
    if status == "finished":
        raise ConfigError(
            f"the run in {run_dir} is already finished (status.json): nothing to resume; drop resume=true "
            "and choose a new hydra.run.dir to train again"
        )
    if not last.is_file():
        raise ConfigError(f"resume=true but there is no checkpoint to resume from ({last} does not exist): run without "
                          "resume=true to start")
    verify_checkpoint(last)
    return last


def record_settings(run_dir: str | Path, settings: dict[str, Any]) -> None:
    """Keep the settings a fresh run starts with (``{dotted key: value}``), for ``check_resumed_settings``."""
    write_json(Path(run_dir) / SETTINGS, settings)


def check_resumed_settings(run_dir: str | Path, settings: dict[str, Any]) -> None:
    """Raise ConfigError naming every setting in ``settings`` that differs from those the run in ``run_dir`` started
    with: a resumed run continues the same training, so it cannot change what it trains on or how (a run that
    predates the record is not checked)."""
    path = Path(run_dir) / SETTINGS
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    settings = json.loads(json.dumps(settings, default=str))  # compared as recorded: tuples become lists
    unset = "<unset>"
    changed = [f"{key}={settings.get(key, unset)} (was {recorded.get(key, unset)})"
               for key in sorted(set(settings) | set(recorded)) if settings.get(key, unset) != recorded.get(key, unset)]
    if changed:
        raise ConfigError(f"resume=true with changed training settings: {', '.join(changed)}; resume with the run's "
                          f"own settings ({path}), or train anew in a new hydra.run.dir")


def dictionary_from_checkpoint(path: str | Path, name: str | None = None):
    """The dictionary as it was at a training checkpoint (``checkpoints/*.ckpt``), checked against its checksum;
    ``name`` picks a member of a set (required when the run trained several)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at '{path}'")
    verify_checkpoint(path)
    # tensors and plain containers only: no pickled code
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    members = checkpoint["hyper_parameters"]["dictionaries"]
    names = [m["name"] for m in members]
    if name is None and len(members) > 1:
        raise ConfigError(f"{path} holds {len(members)} dictionaries ({', '.join(map(str, names))}): pass name=...")
    if name is not None and name not in names:
        raise ConfigError(f"{path} has no dictionary named '{name}' (it has: {', '.join(map(str, names))})")
    index = names.index(name) if name is not None else 0
    dictionary = build(**members[index]["dictionary"])
    prefix = f"members.{index}.dictionary."
    dictionary.load_state_dict(
        {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    )
    return dictionary.eval()
