"""Train a sparse dictionary on live LM activations: `python train.py [overrides]`, or `-m` for a sweep."""

import hydra
from omegaconf import DictConfig

from sae.errors import exit_on_config_error


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from sae.train import hydra_run_info, train

    train(cfg, hydra_run_info())


if __name__ == "__main__":
    main()
