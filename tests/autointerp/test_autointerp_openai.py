"""The openai backend against a real OpenAI-compatible HTTP server on 127.0.0.1 (FastAPI + uvicorn over the
hf_local backend with a tiny random LM): same answers as in-process, chat-only refusal, bad endpoints."""

import math
import socket

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from autointerp_helpers import byte_backend, planted_codes, word_decode  # noqa: E402

from sae.autointerp import RecordConfig, StudyConfig, iter_feature_activations, run_study  # noqa: E402
from sae.autointerp.backends.base import CachedBackend, ChatRequest, LogprobRequest, SimulationUnsupported  # noqa: E402
from sae.autointerp.backends.openai_api import OpenAIBackend  # noqa: E402
from sae.autointerp.cache import ResponseCache  # noqa: E402
from sae.autointerp.interpret import Explanation, LLMInterpreter  # noqa: E402
from sae.autointerp.prompts import simulation_prompt  # noqa: E402
from sae.autointerp.records import Fragment  # noqa: E402
from sae.autointerp.scoring import expected_value  # noqa: E402
from sae.autointerp.serve import create_app, running  # noqa: E402
from sae.errors import ConfigError  # noqa: E402

KEY = "SAE_AUTOINTERP_TEST_KEY"
RECORDS = RecordConfig(fragment_len=8, n_explain=2, n_score_top=2, n_score_random=1,
                       n_quantiles=1, per_quantile=1)


@pytest.fixture(scope="module")
def server():
    with running(create_app(byte_backend(), served_name="tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def chat_only():
    with running(create_app(byte_backend(), served_name="tiny", completions=False)) as url:
        yield url


def _client(url, monkeypatch, **kw):
    monkeypatch.setenv(KEY, "sk-test-not-a-secret")
    return OpenAIBackend(url, "tiny", api_key_env=KEY, concurrency=2, max_retries=1, backoff_s=0.01, **kw)


def test_chat_over_http_matches_the_in_process_model(server, monkeypatch):
    remote = _client(server, monkeypatch)
    reqs = [ChatRequest((("system", "be brief"), ("user", f"say {w}")), max_tokens=4, top_logprobs=5) for w in "ab"]
    local, http = byte_backend().chat(reqs), remote.chat(reqs)
    for a, b in zip(local, http):
        assert a.text == b.text
        assert set(a.first_logprobs) == set(b.first_logprobs)
        assert all(math.isclose(a.first_logprobs[k], b.first_logprobs[k], abs_tol=1e-4) for k in a.first_logprobs)
    started = [ChatRequest((("user", "say a"),), max_tokens=4, prefix="Explanation:")]
    (prefilled,) = _client(server, monkeypatch, prefill=True).chat(started)  # continue_final_message, as vLLM
    assert prefilled.text == byte_backend().chat(started)[0].text and prefilled.text.startswith("Explanation:")


def test_prompt_logprobs_over_echo_match_and_give_the_same_simulation(server, monkeypatch):
    remote = _client(server, monkeypatch, top_logprobs=300)  # the whole tiny vocabulary, digits included
    sim = simulation_prompt("the word cat", [" the", " cat", " sat"])
    req = LogprobRequest(sim.text, sim.positions, top_logprobs=300)
    (local,), (http,) = byte_backend().prompt_logprobs([req]), remote.prompt_logprobs([req])
    for p in sim.positions:
        a, b = local.at(p), http.at(p)
        assert set(a) == set(b) and all(math.isclose(a[k], b[k], abs_tol=1e-4) for k in a)
        assert math.isfinite(expected_value(a)) and expected_value(a) == pytest.approx(expected_value(b), abs=1e-4)
    frag = Fragment(0, [0, 1, 2], [" the", " cat", " sat"], [0.0, 1.0, 0.0], [0, 10, 0])
    expl = Explanation("the word cat", "")
    (via_http,) = LLMInterpreter(remote, top_logprobs=300).simulate([(expl, frag)])
    (in_process,) = LLMInterpreter(byte_backend(), top_logprobs=300).simulate([(expl, frag)])
    assert via_http == pytest.approx(in_process, abs=1e-4) and all(0 <= v <= 10 for v in via_http)


def _source():
    codes, ids = planted_codes(n_ctx=8, seq=16)
    return iter_feature_activations("dictionary", "blocks.1.hook_resid_post", 1, codes, ids, [0, 1], 8)


def test_a_study_through_the_endpoint_is_cached_and_replays_without_it(server, monkeypatch, tmp_path):
    cache = ResponseCache(tmp_path / "cache.sqlite")
    interp = LLMInterpreter(CachedBackend(_client(server, monkeypatch), cache), explain_max_tokens=12)
    cfg = StudyConfig(records=RECORDS, n_bootstrap=20, controls=False)
    res = run_study(_source(), interp, word_decode, tmp_path / "a", cfg, cache=cache)
    assert res.meta["explainer"] == {"backend": "openai", "model": "tiny", "endpoint": server}
    assert len(res.rows) == 2 and res.meta["cache"]["misses"] > 0
    for row in res.rows:  # a random LM rarely writes a parseable phrase; either way it is recorded as such
        assert row["explanation_parsed"] == (row["explanation"] is not None)
    cache.close()
    replay = ResponseCache(tmp_path / "cache.sqlite", mode="replay")
    dead = OpenAIBackend("http://127.0.0.1:9/v1", "tiny", api_key_env=None, max_retries=0)
    again = run_study(_source(), LLMInterpreter(CachedBackend(dead, replay), explain_max_tokens=12), word_decode,
                      tmp_path / "b", cfg, cache=replay)
    assert replay.misses == 0 and replay.hits == res.meta["cache"]["misses"] + res.meta["cache"]["hits"]
    assert [r["explanation"] for r in again.rows] == [r["explanation"] for r in res.rows]


def test_a_chat_only_endpoint_refuses_simulation_in_one_line_and_still_scores(chat_only, monkeypatch, tmp_path, capsys):
    remote = _client(chat_only, monkeypatch)
    with pytest.raises(SimulationUnsupported) as err:
        remote.check_prompt_logprobs()
    assert "serves no /v1/completions with echo and logprobs" in str(err.value) and "\n" not in str(err.value)
    interp = LLMInterpreter(remote, explain_max_tokens=12)
    cfg = StudyConfig(records=RECORDS, n_bootstrap=20, controls=False, scorers=("simulation", "detection"))
    res = run_study(_source(), interp, word_decode, tmp_path / "a", cfg)
    assert res.meta["scorers"] == ["detection"] and "simulation is left out" in res.meta["notes"][0]
    assert "serves no /v1/completions" in capsys.readouterr().err
    with pytest.raises(SimulationUnsupported):
        run_study(_source(), interp, word_decode, tmp_path / "b", StudyConfig(records=RECORDS, scorers=("simulation",)))
    assert not (tmp_path / "b" / "autointerp_summary.csv").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_endpoints_and_keys_are_one_line_each(server, monkeypatch):
    dead = OpenAIBackend(
        f"http://127.0.0.1:{_closed_port()}/v1", "tiny", api_key_env=None, max_retries=1, backoff_s=0.01
    )
    with pytest.raises(ConfigError, match="cannot reach it after 2 tries") as err:
        dead.chat([ChatRequest((("user", "hi"),), 2)])
    assert "\n" not in str(err.value)
    monkeypatch.delenv("SAE_AUTOINTERP_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="SAE_AUTOINTERP_NO_SUCH_KEY: that environment variable is not set"):
        OpenAIBackend(server, "tiny", api_key_env="SAE_AUTOINTERP_NO_SUCH_KEY")
    wrong = OpenAIBackend(server, "no-such-model", api_key_env=None, max_retries=0)
    with pytest.raises(ConfigError, match="status 404"):
        wrong.chat([ChatRequest((("user", "hi"),), 2)])
