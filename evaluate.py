"""Evaluate dictionaries and baselines on held-out text: `python evaluate.py run=<dir> [baselines=[pca,ica,random,neurons]]`."""

import hydra
from omegaconf import DictConfig

from sae.errors import exit_on_config_error


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from sae.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
