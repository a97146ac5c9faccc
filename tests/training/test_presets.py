"""Experiment presets compose as documented: a preset's settings, hydra.* included, win over config.yaml's."""

from conftest import FIXTURES, ROOT
from hydra import compose, initialize_config_dir


def _compose(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_neox_sweep_preset_names_each_job_by_layer_and_k():
    cfg = _compose("experiment=neox14m_resid_sweep")
    assert cfg.sae.variant == "topk" and cfg.hook.site == "resid" and cfg.data.eval_tokens == 8192
    assert (ROOT / cfg.model.name_or_path).resolve() == (FIXTURES / "neox-owt-14m").resolve()
    assert cfg.hydra.sweep.subdir == "3-k32"  # ${hook.layer}-k${sae.k}, not config.yaml's ${hydra.job.num}
    assert dict(cfg.hydra.sweeper.params) == {"sae.k": "8,16", "hook.layer": "0,1,2,3,4,5"}


def test_command_line_wins_over_a_preset():
    assert _compose("experiment=toy", "sae.l1_coeff=0.2").sae.l1_coeff == 0.2


def test_pythia410m_sweep_preset_covers_its_24_blocks():
    cfg = _compose("experiment=pythia410m_resid_sweep")
    assert cfg.model.name_or_path == "EleutherAI/pythia-410m-deduped" and cfg.sae.variant == "relu_tied"
    assert dict(cfg.hydra.sweeper.params) == {"hook.layer": "range(24)", "sae.l1_coeff": "0.02,0.04"}


def test_jumprelu_set_preset_is_one_jumprelu_set_over_the_six_blocks():
    """The recommended L0-penalised configuration (docs: Training): one set, one JumpReLU per block, the paper's sae
    untouched."""
    cfg = _compose("experiment=neox14m_jumprelu_set")
    assert cfg.sae.variant == "jumprelu" and cfg.sae.l0_coeff == 0.01 and cfg.train.tokens == 1_000_000
    assert [(d.name, d.hook.layer) for d in cfg.dictionaries] == [(f"layer{i}", i) for i in range(6)]
    assert (ROOT / cfg.model.name_or_path).resolve() == (FIXTURES / "neox-owt-14m").resolve()
    assert _compose().sae.variant == "relu_tied"  # the default stays the paper's
