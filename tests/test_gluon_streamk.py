"""Stream-K ranges of the persistent Gluon forward (kernels/gluon_streamk.py; opt-in TILEATTN_GLUON_FWD_STREAMK=1):
the programs' shares and the split items' records (CPU, against a mirror of the kernel's arithmetic), the merge
kernel against a float64 merge (CPU interpreter or GPU), the launcher's scope (CPU), and on Hopper the forward and
its gradients under the accuracy rule, run-to-run bit-identical."""
import math

import pytest
import torch

import tileattn
from _helpers import DEVICE, HOPPER, feature_kwargs, make_gen, make_qkv, randn, seed_for
from tileattn import configs
from tileattn.kernels import gluon_forward, gluon_streamk

KNOB = "TILEATTN_GLUON_FWD_STREAMK"
hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon forward runs on sm90 only")


@pytest.mark.parametrize("num_items, n, nprog", [(2048, 8, 132), (1024, 256, 132), (3072, 8, 132), (7, 5, 3),
                                                 (10, 1, 4), (133, 16, 132), (5, 64, 132), (2112, 8, 132)])
def test_ranges_cover_every_tile_once(num_items, n, nprog):
    """The host's mirror of the kernel's schedule (``gluon_streamk.segments``): every key tile of every item is
    computed by exactly one segment; a program's segments are consecutive, at most its first and last partial
    (slots 0 and 1); shares differ by at most one tile; and the merge table lists each split item's segments in
    program order with the records the kernel writes (p * 2 + slot)."""
    segs = gluon_streamk.segments(num_items, n, nprog)
    seen = torch.zeros(num_items, n, dtype=torch.int32)
    parts = {}
    for pid, mine in enumerate(segs):
        for j, (item, lo, count, slot) in enumerate(mine):
            assert count >= 1
            seen[item, lo:lo + count] += 1
            if slot >= 0:
                assert (slot == 0) == (j == 0) and (j in (0, len(mine) - 1))
                parts.setdefault(item, []).append(pid * 2 + slot)
    assert bool((seen == 1).all())
    shares = [sum(c for _, _, c, _ in mine) for mine in segs]
    assert max(shares) - min(shares) <= 1 and sum(shares) == num_items * n
    items, offsets, records = gluon_streamk._table(num_items, n, nprog)
    assert items == sorted(parts) and all(records[offsets[i]:offsets[i + 1]] == parts[it] for i, it in
                                          enumerate(items))
    if num_items % nprog == 0 and num_items >= nprog:
        assert items == []  # whole items only: the same schedule as without stream-K


def test_protocol_model_on_streamk_schedules():
    """benchmarks/persistent_protocol.check_fwd (the persistent forward's barriers, ring slots and turns) on
    stream-K schedules: segments of unequal lengths, a program's first and last partial; 60 random cases with two
    or three warpgroups and two or three K slots, and one by hand (every segment computed once, by its program)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import persistent_protocol as pp
    items, order = pp.streamk_items(7, 4, 3)  # 28 tiles: 9, 9, 10 per program
    assert [sum(items[i] for i in mine) for mine in order] == [9, 9, 10]
    done = pp.check_fwd(items, 3, 2, 3, 2, None, 5, None, order)
    assert all(done[i] == pid for pid, mine in enumerate(order) for i in mine)
    pp.random_streamk_cases(60)


@pytest.mark.parametrize("sink", [False, True], ids=["", "sink"])
def test_merge_kernel(sink):
    """The merge of split items against float64: random rows of scores cut into 2-3 key ranges, each range's
    (unnormalised output, max, sum) in log2 units in its record, as the kernel leaves them; out, lse and the
    residual as the epilogue computes them (rows past seqlen_q untouched)."""
    gen = make_gen(seed_for("streamk-merge", sink))
    B, H, S, D, NW, HALF_M, nprog, n = 2, 3, 200, 64, 2, 64, 5, 4
    num_m_tiles = math.ceil(S / (NW * HALF_M))
    num_items = B * H * num_m_tiles
    scores = randn((num_items, NW * HALF_M, n * 16), torch.float32, gen).double() * 3  # log2 units
    values = randn((num_items, n * 16, D), torch.float32, gen).double()
    sink_logit = randn((H, ), torch.float32, gen) if sink else None
    size = gluon_streamk.record_size(HALF_M, D)
    part = torch.zeros(nprog * 2 * NW * size, dtype=torch.float64)
    for pid, mine in enumerate(gluon_streamk.segments(num_items, n, nprog)):
        for item, lo, count, slot in mine:
            if slot < 0:
                continue
            s = scores[item, :, lo * 16:(lo + count) * 16]
            m = s.max(dim=1).values
            p = torch.exp2(s - m[:, None])
            acc = p @ values[item, lo * 16:(lo + count) * 16]
            for w in range(NW):
                rows = slice(w * HALF_M, (w + 1) * HALF_M)
                base = ((pid * 2 + slot) * NW + w) * size
                part[base:base + HALF_M * D] = acc[rows].reshape(-1)
                part[base + HALF_M * D:base + HALF_M * D + HALF_M] = m[rows]
                part[base + HALF_M * D + HALF_M:base + size] = p.sum(dim=1)[rows]
    out = torch.full((B, S, H, D), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    resid = torch.full_like(out, float("nan"))
    lse = torch.full((B, H, S), float("nan"), device=DEVICE)
    gluon_streamk.merge(part.float().to(DEVICE), num_items, n, nprog, NW, HALF_M, out, lse, resid,
                        None if sink_logit is None else sink_logit.to(DEVICE), num_m_tiles, H, S, H * S, S)
    out, lse, resid = out.cpu(), lse.cpu(), resid.cpu()
    split, _, _ = gluon_streamk._table(num_items, n, nprog)
    assert split, "the case should split items"
    for item in range(num_items):
        bh, tile = divmod(item, num_m_tiles)
        b, h = divmod(bh, H)
        rows = range(tile * NW * HALF_M, min(S, (tile + 1) * NW * HALF_M))
        got_o = out[b, rows.start:rows.stop, h].double()
        if item not in split:
            assert torch.isnan(got_o).all(), "a whole item's rows were written by the merge"
            continue
        s = scores[item, :len(rows)]
        if sink:
            s = torch.cat([s, torch.full((len(rows), 1), sink_logit[h].item() * 1.4426950408889634,
                                         dtype=torch.float64)], 1)
        ref_lse2 = torch.logsumexp(s * math.log(2), dim=1) / math.log(2)
        p = torch.exp2(s - ref_lse2[:, None])[:, :n * 16]
        ref_o = p @ values[item]
        torch.testing.assert_close(got_o, ref_o, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(lse[b, h, rows.start:rows.stop].double(), ref_lse2 * math.log(2), atol=1e-4,
                                   rtol=1e-5)
        r = resid[b, rows.start:rows.stop, h].double()
        assert bool(((got_o + r) - ref_o).abs().max() < 1e-3), "out + residual is not the fp32 result"


def test_launcher_scope_on_cpu(monkeypatch):
    """The knob (off by default) gives STREAMK and the scratch to batched non-causal persistent calls whose items
    do not divide among the programs, then merges; not causal calls (the work list), not calls whose items divide,
    not the int8 residual."""
    from test_gluon_forward import _host_launch
    merges = []
    monkeypatch.setattr(gluon_streamk, "merge", lambda *a, **k: merges.append(a))
    shape = (8, 2048, 2048, 16, 16, 128)  # 16 x 8 x 16 = 2048 items on 132 programs
    _, kw, _, _ = _host_launch(monkeypatch, shape)
    assert kw["PERSISTENT"] and "STREAMK" not in kw and not merges
    _, kw, _, _ = _host_launch(monkeypatch, shape, knobs={KNOB: "1"})
    assert kw["STREAMK"] and kw["PART"].numel() == 132 * 2 * 2 * gluon_streamk.record_size(64, 128)
    assert len(merges) == 1 and merges[0][1:4] == (2048, 16, 132)
    _, kw, _, _ = _host_launch(monkeypatch, shape, causal=True, knobs={KNOB: "1"})
    assert "STREAMK" not in kw
    _, kw, _, _ = _host_launch(monkeypatch, (1, 16896, 16896, 1, 1, 128), knobs={KNOB: "1"})  # 132 items
    assert "STREAMK" not in kw
    _, kw, _, _ = _host_launch(monkeypatch, shape, knobs={KNOB: "1", "TILEATTN_RESIDUAL": "int8"})
    assert "STREAMK" not in kw
    assert len(merges) == 1
    monkeypatch.setenv(KNOB, "yes")
    with pytest.raises(ValueError, match=KNOB):
        configs.gluon_forward_streamk()


# (B, Sq, Sk, Hq, Hkv, D, features); every case more items than 132 programs, not a multiple of them
STREAMK_CASES = [(2, 2100, 2100, 16, 8, 128, {}),  # 544 items
                 (3, 1031, 900, 8, 2, 128, dict(sink=True, softcap=8.0)),  # 216
                 (2, 2048, 2048, 8, 8, 64, {}),  # three warpgroups: 176 items of 192 rows
                 (4, 1000, 1000, 8, 4, 64, dict(sink=True)),  # two warpgroups: 256
                 (2, 2100, 2100, 8, 8, 256, {}),  # 272
                 (3, 700, 1300, 8, 4, 256, dict(alibi=True, sink=True)),  # 144
                 (4, 1000, 4000, 16, 4, 128, dict(alibi=True))]  # 512


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("case", STREAMK_CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "-".join(c[6]))
def test_streamk_forward(case, monkeypatch):
    """With the knob (132 or 114 programs on an H100 / H200): the call launches with STREAMK (items split between
    programs), out and lse match the default launch's to within the fp32 reassociation of the split items' sums,
    the same bits on a second call, and out, lse and the gradients (through the merged residual) pass the
    accuracy rule against float64."""
    B, Sq, Sk, Hq, Hkv, d, feat = case
    q, k, v, gen = make_qkv(B, Sq, Sk, Hq, Hkv, d, torch.bfloat16, seed_for("gluon-streamk", case[:6]),
                            requires_grad=True)
    kw = feature_kwargs(feat, Hq, gen)
    monkeypatch.setenv("TILEATTN_GLUON_ALIBI", "general")  # the persistent grid's form
    want = tileattn.attention(q, k, v, return_lse=True, **kw)
    seen = []
    real = gluon_forward.launch
    monkeypatch.setattr(gluon_forward, "launch", lambda fn, grid, args, kwargs, *r, **o: (
        seen.append(kwargs), real(fn, grid, args, kwargs, *r, **o))[1])
    monkeypatch.setenv(KNOB, "1")
    got = tileattn.attention(q, k, v, return_lse=True, **kw)
    again = tileattn.attention(q, k, v, return_lse=True, **kw)
    assert seen and seen[-1].get("STREAMK"), "the call did not take stream-K ranges"
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1]), "not reproducible"
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=2 ** -7, rtol=2 ** -7)
    import test_features
    test_features._check(q, k, v, randn((B, Sq, Hq, d), torch.bfloat16, gen), entry="tileattn",
                         ctx="gluon stream-K", **kw)
