"""Train sparse dictionaries on live LM activations: `python train.py [overrides]`, or `-m` for a sweep."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae.cli import check_command_line
from sae.errors import exit_on_config_error
from sae.training.config import MOVED  # importing registers the config schemas

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from sae.training.run import hydra_run_info, train

    train(cfg, hydra_run_info())


if __name__ == "__main__":
    check_command_line(CONF, "config", MOVED)
    main()
