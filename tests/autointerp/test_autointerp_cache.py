"""The response cache: hits, a replay miss is an error, and a killed study resumes from what it stored."""

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from autointerp_helpers import HashLLM, planted_codes, word_decode

from sae.autointerp import RecordConfig, StudyConfig, iter_feature_activations, run_study
from sae.autointerp.backends.base import CachedBackend, ChatRequest
from sae.autointerp.cache import ResponseCache
from sae.autointerp.interpret import LLMInterpreter
from sae.errors import ConfigError

HERE = Path(__file__).resolve().parent
CFG = StudyConfig(records=RecordConfig(fragment_len=16, n_explain=2, n_score_top=2,
                                       n_score_random=2, n_quantiles=2, per_quantile=1), n_bootstrap=50, chunk=4)


def _source():
    codes, ids = planted_codes()
    return list(iter_feature_activations("dictionary", "blocks.1.hook_resid_post", 1, codes, ids, [0, 1, 2], 16))


def test_second_call_is_a_hit_and_replay_refuses_a_miss(tmp_path):
    llm = HashLLM()
    cache = ResponseCache(tmp_path / "c.sqlite")
    backend = CachedBackend(llm, cache)
    req = ChatRequest((("user", "hello"),), max_tokens=8)
    first = backend.chat([req])
    again = backend.chat([req])
    assert first == again and llm.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    other = ChatRequest((("user", "hello"),), max_tokens=9)  # parameters are part of the key
    backend.chat([other])
    assert llm.calls == 2 and len(cache) == 2
    cache.close()
    replay = ResponseCache(tmp_path / "c.sqlite", mode="replay")
    assert CachedBackend(llm, replay).chat([req]) == first and llm.calls == 2
    with pytest.raises(ConfigError, match="cache_mode=replay: 1 chat request"):
        CachedBackend(llm, replay).chat([ChatRequest((("user", "new"),), max_tokens=8)])
    with pytest.raises(ConfigError, match="needs an existing cache file"):
        ResponseCache(tmp_path / "absent.sqlite", mode="replay")


KILLED = """
import sys
sys.path[:0] = [{here!r}, {root!r}, {tests!r}]
from pathlib import Path
from test_autointerp_cache import CFG, _source
from autointerp_helpers import HashLLM, word_decode
from sae.autointerp import run_study
from sae.autointerp.backends.base import CachedBackend
from sae.autointerp.cache import ResponseCache
from sae.autointerp.interpret import LLMInterpreter
cache = ResponseCache(sys.argv[1])
interp = LLMInterpreter(CachedBackend(HashLLM(delay_s=0.15), cache))
run_study(_source(), interp, word_decode, sys.argv[2], CFG, cache=cache)
"""


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_a_killed_study_resumes_from_the_cache_and_writes_nothing_half_done(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(here=str(HERE), root=str(HERE.parents[1]), tests=str(HERE.parent)))
    db, out = tmp_path / "cache.sqlite", tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    stored = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                stored = sqlite3.connect(db).execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            except sqlite3.OperationalError:
                stored = 0
        if stored >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the study finished before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "autointerp_summary.csv").exists() and not (out / "autointerp.csv").exists()
    assert not (out / "autointerp" / "records.jsonl").exists()

    cache = ResponseCache(db)
    resumed_llm = HashLLM()
    resumed = run_study(
        _source(), LLMInterpreter(CachedBackend(resumed_llm, cache)), word_decode, out, CFG, cache=cache
    )
    assert cache.hits >= stored >= 5, "the answers stored before the kill must be reused"
    assert resumed.meta["cache"]["hits"] == cache.hits and resumed_llm.calls == cache.misses
    run_study(_source(), LLMInterpreter(HashLLM()), word_decode, tmp_path / "fresh", CFG)
    assert _rows(out / "autointerp.csv") == _rows(tmp_path / "fresh" / "autointerp.csv")
    assert not [p for p in out.iterdir() if p.name.startswith(".autointerp-staging")]
