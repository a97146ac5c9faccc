"""Files a run writes while it trains: atomic Lightning checkpoints and a status file that says how the run ended."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pytorch_lightning.plugins.io import TorchCheckpointIO

from sae.saving import write_json

STATUS = "status.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary name and renamed, so a kill never leaves half a checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def write_status(run_dir: str | Path, state: str, **extra) -> None:
    """Record ``state`` (``running``, ``finished`` or ``failed``) in ``<run_dir>/status.json``."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(run_dir) / STATUS, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})
