"""Circuit targets from the command line and their bad-input lines (no model needed)."""

import pytest
from conftest import make_tokenizer

from sae.circuits.targets import (
    FeatureTarget,
    TaskTarget,
    TokenTarget,
    check_feature,
    folder_name,
    last_hook,
    parse_target,
    upstream_hook,
)
from sae.errors import ConfigError

WIDTHS = {"layers.0.resid": 64, "layers.1.resid": 64, "layers.2.resid": 32, "layers.1.mlp": 16}


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("words"))


def test_parse_targets(words):
    assert parse_target("layers.2.resid:7") == FeatureTarget("layers.2.resid", 7)
    assert parse_target("2:7") == FeatureTarget("layers.2.resid", 7) and parse_target("2:7").layer == 2
    assert parse_target({"feature": "layers.1.mlp:3", "token": None}) == FeatureTarget("layers.1.mlp", 3)
    assert parse_target({"token": "cat"}, words) == TokenTarget("cat", words.convert_tokens_to_ids("cat"))
    assert parse_target({"task": "logit_diff"}) == TaskTarget("logit_diff")
    assert folder_name(parse_target("2:7")) == "layers.2.resid_7" and folder_name(TaskTarget("kl")) == "task_kl"


@pytest.mark.parametrize("spec, message", [
    ("layers.2.resid", "give <hook>:<feature index>"), ("blocks.2:7", "not of the form layers"),
    ({"feature": "2:1", "task": "kl"}, "exactly one of"), ({}, "exactly one of"), (None, "target is missing"),
    ({"task": "accuracy"}, "target.task='accuracy'"), ({"token": "cat dog"}, "is 2 tokens for this tokenizer"),
])
def test_bad_targets(words, spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_target(spec, words)


def test_checks_against_the_run():
    check_feature(FeatureTarget("layers.2.resid", 31), WIDTHS)
    with pytest.raises(ConfigError, match="out of range: layers.2.resid's dictionary has 32 features"):
        check_feature(FeatureTarget("layers.2.resid", 32), WIDTHS)
    with pytest.raises(ConfigError, match="has no dictionary"):
        check_feature(FeatureTarget("layers.5.resid", 0), WIDTHS)
    assert upstream_hook("layers.2.resid", WIDTHS) == "layers.1.resid"
    assert upstream_hook("layers.2.mlp", WIDTHS) == "layers.1.mlp"
    with pytest.raises(ConfigError, match="no dictionary at layer -1"):
        upstream_hook("layers.0.resid", WIDTHS)
    assert last_hook(WIDTHS) == "layers.2.resid"
