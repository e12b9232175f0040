"""The portable (non-Hopper) tile tables, forced on whatever GPU runs the tests (TILEATTN_ARCH=8.0 / 8.6).

Issue 4 keeps a portable path for every GPU that is not Hopper: the same kernels with the generic tile tables,
sized for sm80 (163 KB shared memory) or sm86/sm89 (99 KB), and no TMA. On a Hopper card these tests pick those
tables through ``TILEATTN_ARCH`` and rerun the forward/backward checks of the other test files with them.
On the CPU the interpreter has its own tiles, so only the override's logic is tested (with a faked device).
"""

import pytest
import torch

import test_backward
import test_features
import test_forward
import test_varlen
from _helpers import HALF_DTYPES, ON_GPU
from tileattn import configs

ARCHS = ["8.0", "8.6"]
gpu = pytest.mark.skipif(not ON_GPU, reason="the interpreter does not use the per-arch tables")


@pytest.fixture(params=ARCHS)
def portable(request, monkeypatch):
    monkeypatch.setenv("TILEATTN_ARCH", request.param)
    monkeypatch.delenv("TILEATTN_TMA", raising=False)
    return request.param


@pytest.fixture
def fake_arch(monkeypatch):
    """Pretend device 0 has the given compute capability; the config caches are cleared before and after, so
    no result computed for the fake device outlives the test."""
    def set_arch(arch):
        monkeypatch.setattr(configs, "_device_arch", lambda index: arch)
    configs._forward_config.cache_clear(), configs._backward_config.cache_clear()
    yield set_arch
    configs._forward_config.cache_clear(), configs._backward_config.cache_clear()


def test_override_picks_generic_tables(monkeypatch, fake_arch):
    fake_arch((9, 0))
    sm90 = configs._backward_config(0, torch.bfloat16, 128, False)
    monkeypatch.setenv("TILEATTN_ARCH", "8.0")
    over = configs._arch_override()
    assert over == (8, 0)
    assert configs._forward_config(0, torch.bfloat16, 128, False, over) == configs._table_fwd(8, 128, False)
    sm80 = configs._backward_config(0, torch.bfloat16, 128, False, over)
    assert sm80 != sm90 and sm80.dq == configs._table_bwd(8, 128, False).dq
    # sm86 has 99 KB of shared memory: every chosen tile fits it
    for d in (64, 128, 256):
        for causal in (False, True):
            cfg = configs._forward_config(0, torch.float16, d, causal, (8, 6))
            assert configs._smem_bytes(cfg.block_m, cfg.block_n, cfg.num_stages, d, 2) <= 99 * 1024
            bc = configs._backward_config(0, torch.float16, d, causal, (8, 6))
            assert configs._smem_bytes(2 * bc.dkdv.block_n, bc.dkdv.block_m, bc.dkdv.num_stages, d, 2) <= 99 * 1024
            assert configs._smem_bytes(2 * bc.dq.block_m, bc.dq.block_n, bc.dq.num_stages, d, 2) <= 99 * 1024


def test_override_is_validated(monkeypatch, fake_arch):
    fake_arch((8, 0))
    with pytest.raises(ValueError, match="exceeds"):
        configs._arch(0, (9, 0))
    monkeypatch.setenv("TILEATTN_ARCH", "sm80")
    with pytest.raises(ValueError, match="TILEATTN_ARCH"):
        configs._arch_override()


def test_tma_table(monkeypatch, fake_arch):
    """The forward's K/V path (configs.use_tma): the measured sm_90 table, the env override, and never on
    pre-Hopper parts (also when TILEATTN_ARCH asks for their tables on a Hopper card)."""
    monkeypatch.setattr(configs, "_interpreting", lambda: False)
    monkeypatch.delenv("TILEATTN_TMA", raising=False)
    monkeypatch.delenv("TILEATTN_ARCH", raising=False)
    cuda = torch.device("cuda", 0)
    fake_arch((9, 0))
    bf16 = torch.bfloat16
    assert configs.use_tma(cuda, bf16, 128) and configs.use_tma(cuda, torch.float16, 96, seqlen_k=512)
    assert not configs.use_tma(cuda, bf16, 64) and not configs.use_tma(cuda, bf16, 128, sliding=True)
    assert not configs.use_tma(cuda, torch.float32, 128)
    assert configs.use_tma(cuda, bf16, 256, seqlen_k=2048) and not configs.use_tma(cuda, bf16, 256, seqlen_k=1024)
    monkeypatch.setenv("TILEATTN_TMA", "1")
    assert configs.use_tma(cuda, bf16, 64, sliding=True)
    monkeypatch.setenv("TILEATTN_TMA", "0")
    assert not configs.use_tma(cuda, bf16, 128)
    monkeypatch.setenv("TILEATTN_TMA", "yes")
    with pytest.raises(ValueError, match="TILEATTN_TMA"):
        configs.use_tma(cuda, bf16, 128)
    monkeypatch.setenv("TILEATTN_TMA", "1")
    monkeypatch.setenv("TILEATTN_ARCH", "8.0")
    assert not configs.use_tma(cuda, bf16, 128)
    monkeypatch.delenv("TILEATTN_ARCH")
    fake_arch((8, 0))
    assert not configs.use_tma(cuda, bf16, 128)


@gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full-fp16", "causal-bf16"])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_forward_backward(portable, head_dim, causal):
    dtype = torch.bfloat16 if causal else torch.float16
    test_forward.test_head_dims(head_dim, causal, dtype)
    test_backward.test_head_dims(head_dim, causal, dtype)


@gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_gqa_lse_and_determinism(portable, dtype):
    test_backward.test_gqa(test_backward.GQA_HEADS[-1], True, dtype)
    test_backward.test_grad_through_lse(dtype, True)
    test_backward.test_deterministic(dtype, True)


@gpu
def test_all_features(portable):
    test_features.test_all_features_combined(torch.bfloat16, True, 0.2)
    test_varlen.test_varlen_features("all")
