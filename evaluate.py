"""Evaluate dictionaries, or run a study on them: `python evaluate.py run=<dir> [analysis=<study>] [overrides]`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae.cli import check_command_line
from sae.errors import exit_on_config_error
from sae.evaluation.config import MOVED  # importing registers the config schema
from sae.probing import config as _probing_config  # noqa: F401  (registers analysis=probing's schema)

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from sae.evaluation.studies import run_analysis

    run_analysis(cfg)


if __name__ == "__main__":
    check_command_line(CONF, "evaluate", MOVED)
    main()
