"""Opt-in autotuning (TILEATTN_AUTOTUNE=1, src/tileattn/autotune.py).

CPU: the choice logic with an injected timer — the fastest candidate wins, the choice is cached in memory and in
the JSON file (a new process reads it back without timing), failing candidates are skipped, a corrupt file is
ignored, and nothing is tuned or written in the interpreter. GPU: tuned forward and backward still meet the
accuracy rule, write the cache, and a second call does not time again.
"""

import json

import pytest
import torch

import test_backward
import tileattn
from _helpers import ON_GPU
from tileattn import autotune
from tileattn.configs import KernelConfig


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache directory and an empty in-memory cache (restored after the test)."""
    monkeypatch.setenv("TILEATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_MEMORY", {})
    monkeypatch.setattr(autotune, "_LOADED_FROM", None)
    return tmp_path


ENC = dict(encode=lambda c: [c.block_m, c.block_n, c.num_warps, c.num_stages], decode=lambda v: KernelConfig(*v))
CANDS = [KernelConfig(64, 64, 4, 3), KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 2)]


def _timer_from(ms_by_cand, calls):
    def timer(fn):
        cand = fn()  # run() returns its candidate here
        calls.append(cand)
        return ms_by_cand[cand]
    return timer


def test_fastest_wins_and_is_cached(fresh):
    calls = []
    timer = _timer_from({CANDS[0]: 3.0, CANDS[1]: 1.0, CANDS[2]: 2.0}, calls)
    assert autotune.pick("k1", lambda: CANDS, lambda c: c, timer=timer, **ENC) == CANDS[1]
    assert calls == CANDS
    assert autotune.pick("k1", lambda: CANDS, lambda c: c, timer=timer, **ENC) == CANDS[1]
    assert len(calls) == 3, "a cached choice must not be timed again"
    data = json.loads((fresh / "autotune.json").read_text())
    assert data == {"k1": [128, 64, 8, 3]}
    # a new process: empty memory, the file is read back, nothing is timed
    autotune._MEMORY.clear()
    autotune._LOADED_FROM = None
    assert autotune.pick("k1", lambda: CANDS, lambda c: c, timer=timer, **ENC) == CANDS[1]
    assert len(calls) == 3


def test_failing_candidates_are_skipped(fresh):
    def run(c):
        if c != CANDS[2]:
            raise RuntimeError("out of shared memory")
        return c
    assert autotune.pick("k2", lambda: CANDS, run, timer=lambda fn: (fn(), 1.0)[1], **ENC) == CANDS[2]

    def never(c):
        raise RuntimeError("nothing fits")
    assert autotune.pick("k3", lambda: CANDS, never, timer=lambda fn: (fn(), 1.0)[1], **ENC) == CANDS[0]
    assert "k3" not in autotune._MEMORY, "no choice was measured: nothing to cache"


def test_corrupt_cache_is_ignored(fresh):
    (fresh / "autotune.json").write_text("{not json")
    assert autotune.pick("k4", lambda: CANDS, lambda c: c, timer=lambda fn: 1.0, **ENC) == CANDS[0]
    assert json.loads((fresh / "autotune.json").read_text()) == {"k4": [64, 64, 4, 3]}


@pytest.mark.skipif(ON_GPU, reason="checks the interpreter path")
def test_interpreter_never_tunes(fresh, monkeypatch):
    monkeypatch.setenv("TILEATTN_AUTOTUNE", "1")
    q = torch.randn(1, 17, 2, 16, requires_grad=True)
    assert not autotune.applies(q, "TILEATTN_FWD_CONFIG")
    tileattn.attention(q, q.detach(), q.detach(), causal=True).sum().backward()
    assert not (fresh / "autotune.json").exists() and autotune._MEMORY == {}


@pytest.mark.skipif(not ON_GPU, reason="tunes on the GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tuned_calls_meet_the_rule(fresh, monkeypatch, dtype):
    monkeypatch.setenv("TILEATTN_AUTOTUNE", "1")
    monkeypatch.setenv("TILEATTN_GLUON", "0")  # autotune picks the portable kernel's tiles; the Gluon forward has none
    test_backward.test_gqa(test_backward.GQA_HEADS[-1], True, dtype)  # forward + backward under the rule
    data = json.loads((fresh / "autotune.json").read_text())
    assert any("|fwd|" in k for k in data) and any("|bwd|" in k for k in data)

    def no_timing(fn):
        raise AssertionError("a cached kind of call was timed again")
    monkeypatch.setattr(autotune, "cuda_timer", no_timing)
    test_backward.test_gqa(test_backward.GQA_HEADS[-1], True, dtype)
