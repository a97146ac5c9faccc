"""Evaluate dictionaries, or run a study on them: `python evaluate.py run=<dir> [analysis=<study>] [overrides]`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import sae.autointerp.config  # noqa: F401  (registers the autointerp and explainer schemas)
import sae.circuits.config  # noqa: F401  (importing registers the patching, circuits and task schemas)
import sae.features.config  # noqa: F401  (the features schema)
import sae.probing.config  # noqa: F401  (registers analysis=probing's schema)
from sae.cli import check_command_line
from sae.errors import exit_on_config_error
from sae.evaluation.config import MOVED  # importing registers the top level's, metrics' and residue's schemas

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from sae.evaluation.studies import run_analysis

    run_analysis(cfg)


if __name__ == "__main__":
    check_command_line(CONF, "evaluate", MOVED)
    main()
