"""The persistent Gluon forward with one pipeline across work items (kernels/gluon_flat.py, opt-in
TILEATTN_GLUON_FLAT=1).

GPU (sm90): bit-identical to the plain grid (same arithmetic per query tile, in the same order) with more items
than multiprocessors and fewer, causal in the persistent longest-first order, sliding windows, GQA, Sq != Sk,
sink, softcap (both forms), ALiBi, fp16/bf16, packed varlen on the work list, and within the accuracy rule; calls
outside its scope (causal or windowed with seqlen_q > seqlen_k, varlen sequences without keys or off the work
list, the plain grid) never launch it.
CPU: compiled for sm_90a with Triton's bundled ptxas: no serialised wgmma, spills within the measured budget.
"""

import pytest
import torch

import tileattn
from _helpers import (HALF_DTYPES, HOPPER, assert_compiles, dtype_id, feature_kwargs, lift_gluon_length_limits,
                      make_qkv, ptxas_available, randn, record_gluon_launches, seed_for)
from tileattn.kernels import gluon_forward

hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon forward runs on sm90 only")
needs_gluon = pytest.mark.skipif(not gluon_forward.AVAILABLE, reason="this triton has no Gluon")


def _launches(monkeypatch):
    """(grid, constexpr kwargs) of every Gluon forward launch from now on, the table's length limits lifted."""
    lift_gluon_length_limits(monkeypatch)
    return record_gluon_launches(monkeypatch)


# (B, Sq, Sk, Hq, Hkv, D, features): 2 x 17 x 16 = 544 items on 132 programs (4-5 each), 8 items (fewer than
# programs: one item each), causal rounds in the longest-first order incl. Sq < Sk, one-tile items (Sk <= 128),
# windows bounded on both sides and on one
FLAT_CASES = [(2, 2100, 2100, 16, 8, 128, {}), (1, 1000, 1000, 8, 8, 128, {}),
              (2, 2048, 2048, 16, 4, 128, dict(causal=True)), (3, 257, 1031, 4, 2, 128, dict(causal=True, sink=True)),
              (2, 1000, 1000, 4, 4, 64, {}), (2, 1400, 1400, 12, 4, 64, dict(causal=True)),
              (4, 300, 100, 8, 2, 128, {}), (2, 1500, 1300, 8, 2, 128, dict(softcap=8.0, alibi=True)),
              (2, 1031, 1031, 8, 2, 128, dict(softcap=30.0, sink=True)), (1, 130, 4000, 4, 2, 128, dict(causal=True)),
              (1, 2048, 2048, 8, 8, 128, dict(window_size=(512, 512))),
              (2, 999, 1200, 4, 2, 128, dict(window_size=(300, 40), softcap=8.0, sink=True)),
              (2, 1500, 1500, 4, 2, 128, dict(window_size=(-1, 64)))]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", FLAT_CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "-".join(c[6]))
def test_flat_matches_grid(case, dtype, monkeypatch):
    """TILEATTN_GLUON_FLAT=1 with the persistent grid forced: out and lse bit-identical to the plain grid's, and
    within the accuracy rule (out, lse, gradients) against the float64 reference. ALiBi in its general form on
    both (the plain grid's default linear form rounds differently)."""
    B, Sq, Sk, Hq, Hkv, d, feat = case
    seen = _launches(monkeypatch)
    monkeypatch.setenv("TILEATTN_GLUON_ALIBI", "general")
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, dtype, seed_for("gluon-flat", case[:6], dtype), requires_grad=True)
    kw = feature_kwargs(feat, Hq, gen)
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "0")
    ref = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert seen and not seen[-1][1].get("FLAT", False) and not seen[-1][1]["PERSISTENT"]
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "1")
    monkeypatch.setenv("TILEATTN_GLUON_FLAT", "1")
    got = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert seen[-1][1].get("FLAT", False), "the call did not take the flat pipeline"
    assert torch.equal(got[1], ref[1]), "lse differs from the plain grid's"
    assert torch.equal(got[0], ref[0]), "out differs from the plain grid's"
    import test_features
    test_features._check(q, k, v, randn((B, Sq, Hq, d), dtype, gen), entry="tileattn", ctx="gluon flat", **kw)
    assert seen[-1][1].get("FLAT", False)


@hopper
@pytest.mark.gpu
def test_flat_scope(monkeypatch):
    """With TILEATTN_GLUON_FLAT=1 only persistent calls whose every query tile has a key tile take it: batched
    causal and windowed ones with seqlen_k >= seqlen_q, packed varlen ones with that true of every sequence; not
    those with seqlen_q > seqlen_k (batched or in one sequence), or the plain grid."""
    from _flash_helpers import seqlens_to_cu
    seen = _launches(monkeypatch)
    monkeypatch.setenv("TILEATTN_GLUON_FLAT", "1")
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "1")
    q = torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    short = torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.bfloat16)

    def flat(**kw):
        tileattn.attention(kw.pop("q", q), kw.pop("k", q), kw.pop("v", q), **kw)
        return bool(seen[-1][1].get("FLAT", False))
    assert flat() and flat(causal=True) and flat(q=short, causal=True) and flat(window_size=(256, 256))
    assert flat(q=short, window_size=(-1, 0)) and flat(k=short, v=short)
    assert not flat(k=short, v=short, causal=True) and not flat(k=short, v=short, window_size=(256, 256))
    packed = q.reshape(2048, 8, 128)
    cu, cu_short = seqlens_to_cu([700, 1348]), seqlens_to_cu([300, 1348])
    tileattn.flash_attn_varlen_func(packed, packed, packed, cu, cu, 1348, 1348, causal=True)
    assert seen[-1][1].get("FLAT", False)
    tileattn.flash_attn_varlen_func(packed, packed[:1648], packed[:1648], cu, cu_short, 1348, 1348, causal=True)
    assert not seen[-1][1].get("FLAT", False)
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "0")
    assert not flat()


VARLEN_FLAT = [("full", {}), ("causal", dict(causal=True)), ("window+sink", dict(window_size=(200, 70), sink=True)),
               ("softcap+alibi", dict(softcap=20.0, alibi=True))]


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name,feat", VARLEN_FLAT, ids=[n for n, _ in VARLEN_FLAT])
def test_flat_varlen_matches_grid(name, feat, d, monkeypatch):
    """Packed varlen calls on the persistent work list with the flat pipeline (every sequence with rows has at
    least as many keys as queries; an empty sequence among them): out and lse bit-identical to the plain grid
    over the longest sequence, and within the accuracy rule against the float64 reference per sequence. ALiBi
    in its general form on both."""
    from _flash_helpers import seqlens_to_cu, varlen_ref
    from _helpers import check_lse, check_rule, atol_for, make_gen
    if d == 64 and (feat.get("window_size") or feat.get("softcap") or feat.get("alibi")):
        pytest.skip("D=64 windows / softcap / ALiBi take the portable kernel")
    seen = _launches(monkeypatch)
    monkeypatch.setenv("TILEATTN_GLUON_ALIBI", "general")
    lens_q, lens_k = [177, 0, 1024, 2000, 731, 64, 1], [1500, 0, 1024, 2048, 731, 130, 9]
    gen = make_gen(seed_for("gluon-flat-varlen", name, d))
    q = randn((sum(lens_q), 8, d), torch.bfloat16, gen)
    k = randn((sum(lens_k), 2, d), torch.bfloat16, gen)
    v = randn((sum(lens_k), 2, d), torch.bfloat16, gen)
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    kw = feature_kwargs(feat, 8, gen)
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "0")
    monkeypatch.setenv("TILEATTN_VARLEN_TILEMAP", "0")
    ref = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_attn_probs=True,
                                          **kw)
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "1")
    monkeypatch.setenv("TILEATTN_VARLEN_TILEMAP", "1")
    monkeypatch.setenv("TILEATTN_GLUON_FLAT", "1")
    out, lse, _ = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                  return_attn_probs=True, **kw)
    assert seen[-1][1].get("FLAT", False) and seen[-1][1]["USE_MAP"], "the call did not take the flat work list"
    assert torch.equal(lse, ref[1]) and torch.equal(out, ref[0]), "flat != plain grid"
    ref_o, ref_lse = varlen_ref(True, q, k, v, cu_q, cu_k, **kw)
    pt_o, pt_lse = varlen_ref(False, q, k, v, cu_q, cu_k, **kw)
    check_rule("out", out, ref_o, pt_o, 2, atol_for(torch.bfloat16, ref_o, 1.0), name)
    check_lse(lse, ref_lse, pt_lse, name)


@hopper
@pytest.mark.gpu
def test_flat_varlen_scope(monkeypatch):
    """Varlen calls take the flat pipeline only on the work list and when every sequence with rows has its keys:
    not with a sequence that has queries and no keys (its tile would have no key tile), not with causal and
    fewer keys than queries, not without the work list."""
    from _flash_helpers import seqlens_to_cu
    seen = _launches(monkeypatch)
    monkeypatch.setenv("TILEATTN_GLUON_FLAT", "1")
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "1")
    monkeypatch.setenv("TILEATTN_VARLEN_TILEMAP", "1")

    def flat(lens_q, lens_k, causal=False):
        q = torch.randn(sum(lens_q), 4, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(sum(lens_k), 4, 128, device="cuda", dtype=torch.bfloat16)
        tileattn.flash_attn_varlen_func(q, k, k, seqlens_to_cu(lens_q), seqlens_to_cu(lens_k), max(lens_q),
                                        max(lens_k), causal=causal)
        return bool(seen[-1][1].get("FLAT", False))
    assert flat([300, 0, 77], [300, 5, 100], causal=True) and flat([300, 77], [9, 1])
    assert not flat([300, 77], [300, 0]) and not flat([300, 77], [299, 100], causal=True)
    monkeypatch.setenv("TILEATTN_VARLEN_TILEMAP", "0")
    assert not flat([300, 77], [300, 100])


# measured with this triton's ptxas (NOTES v21a): none for the plain D=64 / D=128 kernels, 40-132 bytes with a
# mask or features (328 with causal + softcap + ALiBi + sink in fp16), at the item boundary, none in the per-tile loop
FLAT_COMPILE = [(128, False, ()), (128, True, ("--sink", "--softcap-fixed-max")), (64, True, ()),
                (128, False, ("--softcap", "--alibi", "--fp16")), (128, False, ("--window", "--sink")),
                (128, True, ("--varlen", "--tile-map")), (128, False, ("--varlen", "--tile-map", "--window", "--sink"))]


@needs_gluon
@pytest.mark.skipif(not ptxas_available(), reason="needs triton's bundled ptxas")
def test_flat_compiles_for_sm90():
    """The flat persistent forward for sm_90a: no serialised wgmma, spills within 160 bytes."""
    assert_compiles([("--head-dim", d, "--flat", "--spill-budget", 160, *(["--causal"] if causal else []), *extra)
                     for d, causal, extra in FLAT_COMPILE],
                    env_extra={"TILEATTN_GLUON": "all", "TILEATTN_FAST_TANH": "1"})


def test_flat_protocol_model():
    """benchmarks/flat_protocol.py, the host model of the flat kernel's barriers (producer, two consumer
    warpgroups, TMA copies landing in random order): no deadlock, every read of its own tile, no buffer refilled
    while in use, the warpgroups' tensor-core rounds in order — for one-item programs, one-tile items, and random
    programs. (A model of the kernel's barrier code: the two must change together.)"""
    import os
    import random
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import flat_protocol
    for items, ks, vs in (([1], 2, 2), ([5], 3, 2), ([1, 1, 1, 1], 2, 2), ([9, 1, 9, 1, 2], 4, 3)):
        assert len(flat_protocol.check(items, ks, vs)) == 2 * (sum(items) + 1)
    rng = random.Random(18)
    for _ in range(200):
        items = [rng.randint(1, 9) for _ in range(rng.randint(1, 7))]
        flat_protocol.check(items, rng.choice((2, 3, 4)), rng.choice((2, 3)), seed=rng.randrange(1 << 30))
