"""flash_attn_with_kvcache (split-KV decode, contiguous and paged caches) vs the float64 reference.

Each sequence's visible keys are gathered from the cache (after the in-place append) and compared with
attention_ref on that sequence, with flash-attn's rule (error <= 2x the same computation at the input dtype + atol).
"""

import numpy as np
import pytest
import torch

import tileattn
from tileattn.reference import attention_ref
from _helpers import DEVICE, LARGE, make_gen, seed_for

DTYPES = [torch.float16, torch.bfloat16] if LARGE else [torch.float32]
CAP = 2048 if LARGE else 70
D = 128 if LARGE else 32
U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -17}


def _rotate(x, cos, sin, interleaved):
    """Reference rotary (direct formula) on the first 2 * cos.shape[-1] dims of x (B, S, H, D); cos/sin (B, S, r)."""
    rot = cos.shape[-1] * 2
    xr, rest = x[..., :rot].double(), x[..., rot:]
    cos, sin = cos[:, :, None, :].double(), sin[:, :, None, :].double()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        y = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((y.to(x.dtype), rest), dim=-1)


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def run_case(dtype, B=2, Sq=1, Hq=4, Hkv=2, d=D, dv=D, cap=CAP, page=None, new=0, causal=False, splits=0, lens=None,
             window=(-1, -1), softcap=0.0, alibi=False, sink=False, bidx=False, rot=False, interleaved=False,
             leftpad=None, poison=False, int_lens=False):
    """leftpad: None, a list of per-row starts, or "random" (uniform in [0, lens[b]]). poison: NaN in every cache
    slot at or past each row's length (paged: in the pages of its block table; a kernel that reads them unmasked
    returns NaN).
    int_lens: pass cache_seqlens as a Python int (every entry of lens equal)."""
    gen = make_gen(seed_for("decode", B, Sq, Hq, Hkv, d, cap, page, new, causal, splits, window, softcap, alibi,
                            sink, bidx, rot, str(dtype), str(leftpad)))
    q = _randn(gen, B, Sq, Hq, d, dtype=dtype)
    if page:
        npages = cap // page
        nblocks = B * npages + 3
        kc, vc = _randn(gen, nblocks, page, Hkv, d, dtype=dtype), _randn(gen, nblocks, page, Hkv, dv, dtype=dtype)
        bt = torch.randperm(nblocks, generator=gen)[:B * npages].view(B, npages).to(DEVICE, torch.int32)
        capn = npages * page
    else:
        nc = B + 2 if bidx else B
        kc, vc = _randn(gen, nc, cap, Hkv, d, dtype=dtype), _randn(gen, nc, cap, Hkv, dv, dtype=dtype)
        bt, capn = None, cap
    bi = torch.randperm(B + 2, generator=gen)[:B].to(DEVICE, torch.int32) if bidx else None
    if lens is None:
        lens = torch.randint(0, capn - new + 1, (B,), generator=gen).tolist()
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    if int_lens:
        assert len(set(lens)) == 1
        lens_t = int(lens[0])
    if poison:
        for b in range(B):
            if page:
                for pg in range(capn // page):
                    blk = int(bt[b, pg])
                    kc[blk, max(lens[b] - pg * page, 0):] = float("nan")
                    vc[blk, max(lens[b] - pg * page, 0):] = float("nan")
                continue
            r = int(bi[b]) if bidx else b
            kc[r, lens[b]:] = float("nan")
            vc[r, lens[b]:] = float("nan")
    if leftpad == "random":
        leftpad = [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lens]
    lp_t = torch.tensor(leftpad, dtype=torch.int32, device=DEVICE) if leftpad is not None else None
    k = _randn(gen, B, new, Hkv, d, dtype=dtype) if new else None
    v = _randn(gen, B, new, Hkv, dv, dtype=dtype) if new else None
    al = torch.rand(Hq, generator=gen).to(DEVICE) if alibi else None
    sk = torch.randn(Hq, generator=gen).to(DEVICE) if sink else None
    cos = sin = None
    if rot:
        ang = torch.rand(capn + Sq, 8, generator=gen).to(DEVICE) * 6
        cos, sin = ang.cos(), ang.sin()
    out, lse = tileattn.flash_attn_with_kvcache(
        q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens_t, cache_batch_idx=bi,
        cache_leftpad=lp_t, block_table=bt,
        causal=causal, window_size=window, softcap=softcap, alibi_slopes=al, num_splits=splits,
        return_softmax_lse=True, sink=sk, rotary_interleaved=interleaved)
    assert out.shape == (B, Sq, Hq, dv) and lse.shape == (B, Hq, Sq)
    for b in range(B):
        L = lens[b] + new
        pos = torch.arange(L, device=DEVICE)
        if page:
            pages = bt[b].long()[pos // page]
            kk, vv = kc[pages, pos % page], vc[pages, pos % page]
        else:
            r = int(bi[b]) if bidx else b
            kk, vv = kc[r, :L], vc[r, :L]
        if new and not rot:  # the new tokens were written in place
            assert torch.equal(kk[lens[b]:], k[b]) and torch.equal(vv[lens[b]:], v[b])
        if new and rot:  # k was rotated (float64 formula, at positions lens[b] ...) before the write; v as given
            kpos = torch.arange(lens[b], lens[b] + new, device=DEVICE)
            k_ro = _rotate(k[b:b + 1].double(), cos[kpos][None], sin[kpos][None], interleaved)[0]
            k_err = (kk[lens[b]:].double() - k_ro).abs().max().item()
            assert k_err <= 2 * U[dtype] * max(1.0, k[b].abs().max().item()), f"b={b}: appended k not rotated"
            assert torch.equal(vv[lens[b]:], v[b])
        qb = q[b:b + 1]
        if rot:
            ar = torch.arange(Sq, device=DEVICE)
            qpos = lens[b] + (ar if (causal or window != (-1, -1)) else 0 * ar)
            qb = _rotate(qb, cos[qpos][None], sin[qpos][None], interleaved)
        if leftpad is not None:  # keys start at leftpad[b]; alignment stays at the sequence's end
            kk, vv = kk[leftpad[b]:], vv[leftpad[b]:]
        kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=al, sink=sk)
        ro, rl = attention_ref(qb, kk[None], vv[None], upcast=True, **kw)
        po, _ = attention_ref(qb, kk[None], vv[None], upcast=False, **kw)
        err, err_pt = (out[b:b + 1].double() - ro).abs().max().item(), (po.double() - ro).abs().max().item()
        atol = U[dtype] * max(1.0, vv.abs().max().item() if vv.shape[0] else 1.0)
        assert err <= 2 * err_pt + atol, f"b={b} L={L}: out err {err:.3e} > 2*{err_pt:.3e} + {atol:.1e}"
        lse_err = (lse[b:b + 1].double() - rl).abs().nan_to_num(0.0).max().item()
        assert lse_err <= 2.0 ** -17 * max(1.0, rl.abs().nan_to_num(0.0).max().item()) * 8
        assert torch.equal(torch.isinf(lse[b:b + 1]), torch.isinf(rl)), "lse -inf pattern"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3, 0])
def test_contiguous_splits(dtype, splits):
    run_case(dtype, splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page", [1, 16, 64, 256])
def test_paged_shuffled(dtype, page):
    # page 256 in the interpreter: a small cache (2 pages per sequence, one kv head, head dim 16)
    small = dict(Hq=2, Hkv=1, d=16, dv=16) if page == 256 and not LARGE else {}
    run_case(dtype, page=page, cap=max(CAP, page * 2), splits=2, **small)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Sq, group", [(1, 1), (4, 4), (16, 8)])
@pytest.mark.parametrize("paged", [False, True])
def test_causal_chunks_gqa_append(dtype, Sq, group, paged):
    run_case(dtype, Sq=Sq, Hq=2 * group if group < 8 else 8, Hkv=2 if group < 8 else 1, new=Sq, causal=True,
             page=16 if paged else None, splits=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lengths_zero_and_full(dtype):
    run_case(dtype, lens=[0, CAP])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_append_at_page_boundary(dtype):
    """Each sequence's appended tokens span two pages (page 8): starting on a page's last slot, mid-page, on a
    page's first slot (ending on the next page's first slot), and filling the cache to its capacity."""
    page, cap = 8, 64
    for lens, new in (([55, 6], 5), ([55, 0], 9)):
        for n in lens:
            assert n // page + 1 == (n + new - 1) // page and n + new <= cap, "the append must span two pages"
        run_case(dtype, page=page, cap=cap, new=new, lens=lens, Sq=new if new > 5 else 1, causal=new > 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_features(dtype):
    run_case(dtype, Sq=3, causal=True, window=(10, 0), softcap=5.0, alibi=True, sink=True, splits=3)


@pytest.mark.parametrize("paged", [None, 16], ids=["contiguous", "paged"])
def test_window_huge_bounds(paged):
    """Window bounds up to int32's maximum mean "every key on that side" (the launcher clamps them to Sq + cache
    capacity: unclamped they overflowed the kernel's int32 positions), against the float64 reference."""
    huge = 2**31 - 1
    for window in ((huge, huge), (huge, 0), (3, huge)):
        run_case(DTYPES[0], Sq=3, page=paged, window=window, splits=2)
    run_case(DTYPES[0], Sq=2, page=paged, causal=True, window=(huge, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_and_batch_idx(dtype, interleaved):
    run_case(dtype, rot=True, new=2, Sq=2, causal=True, interleaved=interleaved)
    run_case(dtype, rot=True, new=2, Sq=2, causal=False, interleaved=interleaved)  # q tokens all at cache_seqlens
    run_case(dtype, bidx=True, new=2, Sq=2, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_rotary_append_rotates_k(dtype, paged, interleaved):
    """With rotary_cos/sin and k/v, the cache rows cache_seqlens[b] ... hold k rotated at those positions (run_case
    compares them with a float64 rotation) and v unchanged; q rotated alike (causal: per token; else all at
    cache_seqlens), partial rotary dim (16 of 32)."""
    page = 16 if paged else None
    run_case(dtype, rot=True, new=3, Sq=3, causal=True, page=page, interleaved=interleaved, splits=2)
    run_case(dtype, rot=True, new=2, Sq=1, page=page, interleaved=interleaved, lens=[0, CAP - 2 - CAP % 16])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combined_features(dtype):
    """Rotary with cache_leftpad (positions stay absolute, as flash-attn's), rotary with cache_batch_idx (contiguous
    cache), softcap with a paged cache, and cache_seqlens given as a Python int (contiguous and paged)."""
    run_case(dtype, B=3, rot=True, new=2, Sq=2, causal=True, leftpad="random", splits=2)
    run_case(dtype, rot=True, bidx=True, new=2, Sq=2, causal=True, interleaved=True)
    run_case(dtype, page=16, softcap=5.0, Sq=2, new=2, causal=True, splits=2)
    run_case(dtype, lens=[37, 37], int_lens=True, new=2, Sq=2, causal=True)
    run_case(dtype, lens=[21, 21], int_lens=True, new=1, page=16, splits=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_split_writes_final(dtype):
    """One split: the split kernel writes out / lse itself (no combine kernel), with the sink folded in there;
    a head dim that fills no whole tile, paged, GQA, several query rows, and an empty sequence."""
    run_case(dtype, Sq=3, causal=True, sink=True, splits=1, d=40, dv=24, page=16, lens=[0, 37])
    run_case(dtype, sink=True, alibi=True, softcap=3.0, splits=1, lens=[CAP, 5])


def test_qk_v_head_dims_differ():
    run_case(DTYPES[0], d=40, dv=24, page=16, splits=2)


def test_splits_agree():
    """Different split counts give the same result within rounding."""
    dtype = DTYPES[0]
    gen = make_gen(7)
    q = _randn(gen, 2, 1, 4, D, dtype=dtype)
    kc, vc = _randn(gen, 2, CAP, 2, D, dtype=dtype), _randn(gen, 2, CAP, 2, D, dtype=dtype)
    outs = [tileattn.flash_attn_with_kvcache(q, kc, vc, num_splits=s) for s in (1, 2, 5)]
    for o in outs[1:]:
        assert (o.float() - outs[0].float()).abs().max().item() <= 4 * U[dtype] * vc.abs().max().item()


def _bad(**kw):
    q = torch.zeros(2, 1, 4, 16, device=DEVICE)
    kc = torch.zeros(2, 16, 2, 16, device=DEVICE)
    args = dict(q=q, k_cache=kc, v_cache=kc.clone())
    args.update(kw)
    return args


@pytest.mark.parametrize("case, exc, pattern", [
    (dict(cache_seqlens=torch.tensor([3, 17], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([3, 4], dtype=torch.int64)), TypeError, "cache_seqlens"),
    (dict(k=torch.zeros(2, 1, 2, 16)), ValueError, "k and v"),
    (dict(block_table=torch.tensor([[0], [5]], dtype=torch.int32)), ValueError, "block_table"),
    (dict(block_table=torch.tensor([[0], [1]], dtype=torch.int64)), TypeError, "block_table"),
    (dict(k_cache=torch.zeros(4, 12, 2, 16), v_cache=torch.zeros(4, 12, 2, 16),
          block_table=torch.tensor([[0], [1]], dtype=torch.int32)), ValueError, "power of two"),
    (dict(rotary_cos=torch.zeros(32, 9), rotary_sin=torch.zeros(32, 9)), ValueError, "rotary"),
    (dict(rotary_cos=torch.zeros(32, 4)), ValueError, "rotary"),
    (dict(num_splits=-1), ValueError, "num_splits"),
])
def test_bad_inputs(case, exc, pattern):
    case = {k_: (v_.to(DEVICE) if isinstance(v_, torch.Tensor) else v_) for k_, v_ in case.items()}
    args = _bad(**case)
    if "k" in case:
        args["k"] = case["k"]
    with pytest.raises(exc, match=pattern):
        tileattn.flash_attn_with_kvcache(**args)


def _kv(*shape, dtype=torch.float32, device=None):
    return torch.zeros(*shape, dtype=dtype, device=device or DEVICE)


_LENS = torch.tensor([3, 4], dtype=torch.int32)
_BT = torch.tensor([[0], [1]], dtype=torch.int32)  # one 16-key page per sequence: capacity 16


@pytest.mark.parametrize("case, exc, pattern", [
    (dict(k=_kv(2, 1, 2, 16), v=_kv(2, 1, 2, 16)), ValueError, "cache_seqlens must be given with k/v"),
    (dict(k="k", v=_kv(2, 1, 2, 16), cache_seqlens=_LENS), TypeError, r"^k must be a torch.Tensor"),
    (dict(k=_kv(2, 1, 2, 16), v=[0.0], cache_seqlens=_LENS), TypeError, r"^v must be a torch.Tensor"),
    (dict(k=_kv(16), v=_kv(2, 1, 2, 16), cache_seqlens=_LENS), ValueError, r"^k must be 4-D"),
    (dict(k=_kv(2, 1, 2, 16), v=_kv(2, 2, 16), cache_seqlens=_LENS), ValueError, r"^v must be 4-D"),
    (dict(k=_kv(2, 1, 2, 16, dtype=torch.float64), v=_kv(2, 1, 2, 16), cache_seqlens=_LENS), TypeError,
     r"^k has dtype torch.float64"),
    (dict(k=_kv(2, 1, 2, 16), v=_kv(2, 1, 2, 16, dtype=torch.int64), cache_seqlens=_LENS), TypeError,
     r"^v has dtype torch.int64"),
    (dict(k=_kv(2, 1, 2, 16, device="meta"), v=_kv(2, 1, 2, 16), cache_seqlens=_LENS), ValueError, r"^k is on meta"),
    (dict(k=_kv(2, 1, 2, 16), v=_kv(2, 1, 2, 16, device="meta"), cache_seqlens=_LENS), ValueError, r"^v is on meta"),
    (dict(causal="no"), TypeError, "causal must be a bool"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softmax_scale=True), TypeError, "softmax_scale must be None or a real number"),
    (dict(softmax_scale="x"), TypeError, "softmax_scale must be None or a real number"),
    (dict(num_splits=2.0), TypeError, "num_splits"),
    (dict(num_splits=True), TypeError, "num_splits"),
    (dict(num_splits=np.int64(-2)), ValueError, "num_splits"),
    (dict(rotary_cos=torch.zeros(32, 0), rotary_sin=torch.zeros(32, 0)), ValueError, r"rotary dim \(2 \* 0\)"),
    (dict(block_table=_BT, cache_seqlens=17), ValueError, "cache_seqlens"),
    (dict(block_table=_BT, cache_seqlens=torch.tensor([3, 17], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (dict(block_table=_BT, cache_seqlens=torch.tensor([15, 2], dtype=torch.int32), k=_kv(2, 2, 2, 16),
          v=_kv(2, 2, 2, 16)), ValueError, r"cache_seqlens \(\+ 2 new tokens\)"),
])
def test_bad_arguments(case, exc, pattern):
    """k/v (type, rank, dtype, device; cache_seqlens required with them), causal, softmax_scale, num_splits,
    an empty rotary table, and lengths past a paged cache's capacity; the caches are left untouched."""
    case = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t)
            for n, t in case.items()}
    args = _bad(**case)
    args["k_cache"].normal_()
    args["v_cache"].normal_()
    kc, vc = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(exc, match=pattern):
        tileattn.flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], kc) and torch.equal(args["v_cache"], vc)


def test_bad_arguments_leave_cache_untouched():
    """An argument error found with k/v given is raised before the append writes the cache."""
    gen = make_gen(5)
    args = _bad(k=_randn(gen, 2, 1, 2, 16, dtype=torch.float32), v=_randn(gen, 2, 1, 2, 16, dtype=torch.float32),
                cache_seqlens=_LENS.to(DEVICE))
    kc, vc = args["k_cache"].clone(), args["v_cache"].clone()
    for bad in (dict(num_splits=-1), dict(num_splits=1.5), dict(causal="yes"), dict(softmax_scale=-1.0),
                dict(rotary_cos=_kv(32, 0), rotary_sin=_kv(32, 0))):
        with pytest.raises((TypeError, ValueError)):
            tileattn.flash_attn_with_kvcache(**args, **bad)
        assert torch.equal(args["k_cache"], kc) and torch.equal(args["v_cache"], vc), bad


def test_numpy_scalars_accepted():
    """numpy bool_ causal, numpy float softmax_scale and numpy int num_splits act as the Python values."""
    gen = make_gen(9)
    q = _randn(gen, 2, 2, 4, 16, dtype=torch.float32)
    kc, vc = _randn(gen, 2, 40, 2, 16, dtype=torch.float32), _randn(gen, 2, 40, 2, 16, dtype=torch.float32)
    lens = torch.tensor([40, 17], dtype=torch.int32, device=DEVICE)
    a = tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, softmax_scale=0.5, num_splits=2)
    b = tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=np.bool_(True),
                                         softmax_scale=np.float32(0.5), num_splits=np.int64(2))
    c = tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=False, softmax_scale=0.5, num_splits=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_leftpad_bad_input():
    lens = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cache_leftpad"):
        tileattn.flash_attn_with_kvcache(**_bad(cache_seqlens=lens,
                                                cache_leftpad=torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)))
    with pytest.raises(ValueError, match="cache_leftpad"):
        tileattn.flash_attn_with_kvcache(**_bad(cache_seqlens=lens,
                                                cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32, device=DEVICE)))
    with pytest.raises(TypeError, match="cache_leftpad"):
        tileattn.flash_attn_with_kvcache(**_bad(cache_leftpad=torch.zeros(2, dtype=torch.int64, device=DEVICE)))
    with pytest.raises(ValueError, match="cache_leftpad"):
        tileattn.flash_attn_with_kvcache(**_bad(cache_leftpad=torch.zeros(3, dtype=torch.int32, device=DEVICE)))


def test_example_generate_paged():
    """examples/generate_paged.py: greedy decoding with a paged cache equals a no-cache forward."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "generate_paged.py")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(ok)" in r.stdout


def test_chunked_prefill_many_rows():
    """Sq x group > 64 query rows: several row blocks per (split, batch, kv head)."""
    run_case(DTYPES[0], Sq=24, Hq=8, Hkv=2, new=24, causal=True, page=16, splits=2)


def test_non_contiguous_cache_batch_idx():
    dtype = DTYPES[0]
    gen = make_gen(11)
    q = _randn(gen, 2, 1, 4, D, dtype=dtype)
    kc, vc = _randn(gen, 5, 40, 2, D, dtype=dtype), _randn(gen, 5, 40, 2, D, dtype=dtype)
    idx = torch.tensor([3, 0, 1, 2], dtype=torch.int32, device=DEVICE)[::2]  # [3, 1], stride 2
    lens = torch.tensor([40, 40], dtype=torch.int32, device=DEVICE)
    a = tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx)
    b = tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_batch_idx=idx.contiguous())
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [False, True])
def test_leftpad(dtype, paged):
    """cache_leftpad: random starts (incl. 0 and the full length) with GQA, splits, causal chunks and an append;
    and with a window, ALiBi and a sink (alignment stays at each sequence's end)."""
    run_case(dtype, B=3, Sq=4, new=4, causal=True, page=16 if paged else None, splits=3, leftpad="random")
    run_case(dtype, B=3, lens=[0, 9, 40], leftpad=[0, 9, 7], page=16 if paged else None, splits=2,
             window=(6, 0), alibi=True, sink=True)



TMA_CASES = {"plain": dict(), "batch_idx_splits": dict(bidx=True, splits=3),
             "causal_append_leftpad": dict(Sq=4, new=4, causal=True, leftpad="random", splits=2),
             "odd_dims_features": dict(d=40, dv=24, softcap=5.0, alibi=True, sink=True, splits=2),
             "window_empty_full": dict(window=(6, 0), lens=[0, CAP], splits=3)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TMA_CASES))
def test_tma_contiguous_cache(monkeypatch, dtype, case):
    """Contiguous caches read through tensor descriptors (configs.decode_tma), with NaN in every slot past each
    row's length (TMA reads whole tiles: the kernel must zero V rows past the sequence's end)."""
    from tileattn import configs
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    c = configs.decode_config(128)
    monkeypatch.setenv("TILEATTN_DECODE_CONFIG", f"{c.block_n},{c.num_warps},{c.num_stages},{c.programs_per_sm},1")
    used, real = [], configs.decode_tma
    monkeypatch.setattr(configs, "decode_tma", lambda *a: used.append(real(*a)) or used[-1])
    run_case(dtype, poison=True, **TMA_CASES[case])
    assert used and all(used)


def test_decode_config_table(monkeypatch):
    """configs.decode_config off the interpreter: contiguous 32-key tiles with 3 stages, 64 with 3 from
    TILEATTN_DECODE_LONG_SPLITS splits (default 16, 0 off), paged 64 with 2 (3 from that split count), paged
    through descriptors 64 with 3, D=256 32 with 2; bad values refused; TILEATTN_DECODE_CONFIG overrides all.
    Host-only."""
    from tileattn import configs
    monkeypatch.setattr(configs, "_interpreting", lambda: False)
    monkeypatch.delenv("TILEATTN_DECODE_CONFIG", raising=False)
    monkeypatch.delenv("TILEATTN_DECODE_LONG_SPLITS", raising=False)
    shape = lambda c: (c.block_n, c.num_stages)  # noqa: E731
    assert shape(configs.decode_config(128)) == (32, 3) and shape(configs.decode_config(128, splits=15)) == (32, 3)
    assert shape(configs.decode_config(128, splits=16)) == (64, 3) and shape(configs.decode_config(64, splits=33)) \
        == (64, 3)
    assert shape(configs.decode_config(128, paged=True)) == (64, 2)
    assert shape(configs.decode_config(128, paged=True, paged_tma=True)) == (64, 3)
    assert shape(configs.decode_config(128, paged=True, splits=15)) == (64, 2)
    assert shape(configs.decode_config(128, paged=True, splits=33)) == (64, 3)  # long-split paged: 3 stages
    assert shape(configs.decode_config(256, splits=64)) == (32, 2)
    monkeypatch.setenv("TILEATTN_DECODE_LONG_SPLITS", "40")
    assert shape(configs.decode_config(128, splits=33)) == (32, 3)
    assert shape(configs.decode_config(128, splits=40)) == (64, 3)
    monkeypatch.setenv("TILEATTN_DECODE_LONG_SPLITS", "0")
    assert shape(configs.decode_config(128, splits=1000)) == (32, 3)
    for bad in ("x", "-3", "1.5"):
        monkeypatch.setenv("TILEATTN_DECODE_LONG_SPLITS", bad)
        with pytest.raises(ValueError, match="TILEATTN_DECODE_LONG_SPLITS"):
            configs.decode_config(128, splits=4)
    monkeypatch.setenv("TILEATTN_DECODE_CONFIG", "16,4,1,2")
    assert shape(configs.decode_config(128, splits=33)) == (16, 1)


def test_default_splits(monkeypatch):
    """decode._default_splits on a 132-SM GPU: programs_per_sm (2) programs per SM, at least 512 keys a split, at
    most 256; paged calls with a long count (>= 16) twice as many (TILEATTN_DECODE_PAGED_SPLITS, 1 off). Host-only."""
    from tileattn import configs, decode
    monkeypatch.setattr(configs, "_interpreting", lambda: False)
    monkeypatch.setattr(configs, "sm_count", lambda device: 132)
    for name in ("TILEATTN_DECODE_CONFIG", "TILEATTN_DECODE_LONG_SPLITS", "TILEATTN_DECODE_PAGED_SPLITS",
                 "TILEATTN_DECODE_WAVES"):
        monkeypatch.delenv(name, raising=False)
    cuda = torch.device("cuda")
    splits = lambda b, h, n, paged=False: decode._default_splits(b, h, n, cuda, 128, paged)  # noqa: E731
    monkeypatch.setenv("TILEATTN_DECODE_WAVES", "0")
    assert splits(8, 8, 65536) == 5 and splits(8, 8, 65536, True) == 5  # 5 < 16: paged unchanged
    assert splits(1, 8, 131072) == 33 and splits(1, 8, 131072, True) == 66
    assert splits(1, 8, 4096) == 8 and splits(1, 8, 4096, True) == 8  # 512 keys a split at least
    assert splits(1, 1, 1 << 20) == 256  # at most 256
    monkeypatch.setenv("TILEATTN_DECODE_PAGED_SPLITS", "1")
    assert splits(1, 8, 131072, True) == 33
    monkeypatch.setenv("TILEATTN_DECODE_PAGED_SPLITS", "0")
    with pytest.raises(ValueError, match="TILEATTN_DECODE_PAGED_SPLITS"):
        splits(1, 8, 131072, True)
    monkeypatch.delenv("TILEATTN_DECODE_PAGED_SPLITS")
    # TILEATTN_DECODE_WAVES=1: contiguous short counts for 3 programs per SM (396 slots), rounded down a split
    # where that fills the waves better: 8 x 8 rows 6 (384 programs; 7 would be 448), 16 x 8 rows 3 (384), 64 x 8
    # rows 1, 4 x 8 rows 12 (384; 13 would be 416); paged and long counts as with 0
    monkeypatch.setenv("TILEATTN_DECODE_WAVES", "1")
    assert splits(8, 8, 65536) == 6 and splits(16, 8, 16384) == 3 and splits(64, 8, 4096) == 1
    assert splits(4, 8, 65536) == 12 and splits(32, 8, 65536) == 2  # 32 x 8: 1 and 2 fill alike, the larger
    assert splits(8, 8, 65536, True) == 5 and splits(16, 8, 16384, True) == 3
    assert splits(1, 8, 131072) == 33 and splits(1, 8, 131072, True) == 66
    assert decode._default_splits(8, 8, 65536, cuda, 256) == 5  # D=256: not measured, unchanged
    for value in ("all", None):  # the default: paged calls too
        if value is None:
            monkeypatch.delenv("TILEATTN_DECODE_WAVES")
        else:
            monkeypatch.setenv("TILEATTN_DECODE_WAVES", value)
        assert splits(8, 8, 65536) == 6 and splits(8, 8, 65536, True) == 6 and splits(16, 8, 16384, True) == 3
        assert splits(1, 8, 131072, True) == 66 and decode._default_splits(8, 8, 65536, cuda, 256, True) == 5
        # 3 x 8 rows: 11 splits at 2 per SM (short), 17 at 3 per SM: short still, not doubled as a long paged count
        assert splits(3, 8, 65536, True) == 16
    monkeypatch.setenv("TILEATTN_DECODE_WAVES", "2")
    with pytest.raises(ValueError, match="TILEATTN_DECODE_WAVES"):
        splits(8, 8, 65536)


PAGED_TMA_CASES = {"p64": dict(page=64),
                   "p128_causal_append_splits": dict(page=128, Sq=4, new=4, causal=True, splits=3),
                   "p64_features": dict(page=64, softcap=5.0, alibi=True, sink=True, window=(40, 0), splits=2),
                   "p64_empty_full": dict(page=64, lens=[0, 256], splits=3)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PAGED_TMA_CASES))
def test_tma_paged_cache(monkeypatch, dtype, case):
    """Paged caches read through tensor descriptors (the default where a page holds whole key tiles: one
    block-table entry per key tile, whose keys lie in one page), shuffled block tables, NaN in every slot past each
    row's length; with cache_leftpad (tiles no longer start at page-aligned keys) or TILEATTN_DECODE_PAGED_TMA=0 the
    gather path runs instead. The descriptor form takes its own config (decode_config(paged_tma=True): 3 stages on
    the GPU), the gather form never."""
    from tileattn import configs
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    monkeypatch.delenv("TILEATTN_DECODE_PAGED_TMA", raising=False)
    used, real = [], configs.decode_tma
    monkeypatch.setattr(configs, "decode_tma", lambda *a: used.append(real(*a)) or used[-1])
    tma_cfgs, real_cfg = [], configs.decode_config
    monkeypatch.setattr(configs, "decode_config",
                        lambda *a, **kw: tma_cfgs.append(kw.get("paged_tma", False)) or real_cfg(*a, **kw))
    run_case(dtype, cap=256, poison=True, **PAGED_TMA_CASES[case])
    assert used and all(used) and any(tma_cfgs)
    used.clear()
    tma_cfgs.clear()
    run_case(dtype, cap=256, page=64, leftpad="random", splits=2)
    assert used and not any(used) and not any(tma_cfgs)
    used.clear()
    monkeypatch.setenv("TILEATTN_DECODE_PAGED_TMA", "0")
    run_case(dtype, cap=256, page=64, splits=2)
    assert used and not any(used) and not any(tma_cfgs)
    monkeypatch.setenv("TILEATTN_DECODE_PAGED_TMA", "yes")
    with pytest.raises(ValueError, match="TILEATTN_DECODE_PAGED_TMA"):
        run_case(dtype, cap=256, page=64)


@pytest.mark.parametrize("sink", [False, True])
def test_many_splits_combine(monkeypatch, sink):
    """More splits than the combine kernel reads at once (32): 16-key tiles, ~38 splits, rows of 0 and full
    length, with and without a sink."""
    monkeypatch.setenv("TILEATTN_DECODE_CONFIG", "16,4,1,2")
    dtype = DTYPES[0]
    run_case(dtype, B=2, Hq=2, Hkv=1, cap=608, lens=[600, 0], splits=40, sink=sink)


def _random_caches(gen, paged, B, cap, Hkv, d, page, dtype):
    """Random K / V caches (k_cache, v_cache, block_table): paged, (B * cap / page) pages of ``page`` slots behind
    a shuffled block table (B, cap / page) int32; else contiguous (B, cap, Hkv, d) and no block table."""
    if paged:
        nblocks = B * cap // page
        kc, vc = _randn(gen, nblocks, page, Hkv, d, dtype=dtype), _randn(gen, nblocks, page, Hkv, d, dtype=dtype)
        return kc, vc, torch.randperm(nblocks, generator=gen).view(B, cap // page).to(DEVICE, torch.int32)
    return _randn(gen, B, cap, Hkv, d, dtype=dtype), _randn(gen, B, cap, Hkv, d, dtype=dtype), None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_cuda_graph_capture(paged):
    """A decode step with an in-place append, captured in a CUDA graph (host reads are skipped while capturing)
    and replayed after q, k, v and the cache lengths changed in place, matches an eager step on copies of the
    caches: the replay sees the new lengths and writes the new tokens where the eager step does."""
    dtype, B, Hq, Hkv, d, cap, page = torch.bfloat16, 2, 8, 2, 64, 256, 16
    gen = make_gen(seed_for("decode-graph", paged))
    kc, vc, bt = _random_caches(gen, paged, B, cap, Hkv, d, page, dtype)
    q, k, v = (_randn(gen, B, 1, h, d, dtype=dtype) for h in (Hq, Hkv, Hkv))
    # Row 0 is full after the append, so the eager warm-up sizes its splits for the whole capacity, as a captured
    # call does: the capture reuses the warm-up's compiled kernels.
    lens = torch.tensor([cap - 1, 7], dtype=torch.int32, device=DEVICE)

    def step(k_cache, v_cache):
        return tileattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, block_table=bt,
                                                causal=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(kc, vc)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(kc, vc)
    lens.copy_(torch.tensor([100, 3], dtype=torch.int32))
    for t in (q, k, v):
        t.copy_(_randn(gen, *t.shape, dtype=dtype))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    graph.replay()
    ref = step(kc_ref, vc_ref)
    torch.cuda.synchronize()
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), "the replay appended somewhere else"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


FUSED_CASES = {"splits3": dict(splits=3), "many_sink": dict(B=2, Hq=2, Hkv=1, cap=608, lens=[600, 0], splits=40,
                                                                  sink=True),
               "chunk_gqa": dict(Sq=16, Hq=8, Hkv=1, causal=True, splits=4),
               "paged16": dict(page=16, splits=5, new=3), "features": dict(softcap=4.0, alibi=True, splits=2,
                                                                           window=(9, 0), Sq=2, causal=True)}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_combine(monkeypatch, case):
    """TILEATTN_DECODE_COMBINE=fused: the last split program of each row block merges the splits (no combine
    kernel): the reference rule as with the combine kernel (several row blocks: Sq=16 x group 8; empty rows; a
    sink; paged with an append; softcap + ALiBi + window); a second call on the same inputs is bit-identical (the
    ticket counters were reset); and it agrees with the combine kernel within rounding."""
    from tileattn.kernels import decode
    kw = FUSED_CASES[case]
    if case == "many_sink":
        monkeypatch.setenv("TILEATTN_DECODE_CONFIG", "16,4,1,2")
    monkeypatch.setenv("TILEATTN_DECODE_COMBINE", "fused")
    launched = []
    real = decode.launch
    monkeypatch.setattr(decode, "launch", lambda fn, *a, **k: launched.append(fn) or real(fn, *a, **k))
    run_case(DTYPES[0], **kw)
    assert decode._decode_combine_kernel not in launched and decode._decode_split_kernel in launched
    dtype = DTYPES[0]
    gen = make_gen(seed_for("decode-fused", case))
    B, Hq, Hkv, cap = kw.get("B", 2), kw.get("Hq", 4), kw.get("Hkv", 2), kw.get("cap", CAP)
    q = _randn(gen, B, kw.get("Sq", 1), Hq, D, dtype=dtype)
    kc, vc = _randn(gen, B, cap, Hkv, D, dtype=dtype), _randn(gen, B, cap, Hkv, D, dtype=dtype)
    lens = torch.tensor([cap, cap // 3][:B], dtype=torch.int32, device=DEVICE)
    sink = torch.randn(Hq, generator=gen).to(DEVICE) if kw.get("sink") else None

    def call():
        return tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=kw["splits"],
                                                causal=kw.get("causal", False), sink=sink, return_softmax_lse=True)
    a, b = call(), call()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "second call differs: counters not reset"
    monkeypatch.setenv("TILEATTN_DECODE_COMBINE", "kernel")
    c = call()
    torch.testing.assert_close(a[0].float(), c[0].float(), atol=4 * U[dtype], rtol=4 * U[dtype])
    torch.testing.assert_close(a[1], c[1], atol=1e-5, rtol=1e-5)


def test_fused_combine_bad_env(monkeypatch):
    monkeypatch.setenv("TILEATTN_DECODE_COMBINE", "yes")
    with pytest.raises(ValueError, match="TILEATTN_DECODE_COMBINE"):
        run_case(DTYPES[0], splits=3)


def test_fused_combine_counters():
    """The fused combine's counter buffers: one per (device, stream) for eager calls, reused while big enough,
    replaced by a bigger zeroed one; every entry zero again after a call (the merging programs reset them)."""
    from tileattn.kernels import decode
    dev = torch.empty(0, device=DEVICE).device  # with its index, as the launcher sees q.device
    a = decode._counters(dev, 10)
    assert a.dtype == torch.int32 and a.numel() >= 10 and not a.any()
    assert decode._counters(dev, 10) is a
    b = decode._counters(dev, a.numel() + 1)
    assert b is not a and b.numel() > a.numel() and not b.any()


def test_fused_combine_resets_counters(monkeypatch):
    """After a fused call (3 x 2 row blocks of counters) the shared buffer is all zero again."""
    from tileattn.kernels import decode
    monkeypatch.setenv("TILEATTN_DECODE_COMBINE", "fused")
    run_case(DTYPES[0], B=3, Sq=4, Hq=4, Hkv=2, causal=True, splits=3)
    buf = decode._counters(torch.empty(0, device=DEVICE).device, 1)
    assert buf.numel() >= 3 * 2 and not buf.any(), "a counter was left non-zero"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="%globaltimer traces need a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_trace_leaves_outputs_alone(paged, monkeypatch):
    """``benchmarks/decode_trace.py``'s instrument: the split kernel given a TRACE buffer computes out and lse
    bit-identical to the plain launch, and every program wrote (start <= end, an SM id, its keys), the keys
    summing to the attended cache positions."""
    from tileattn.kernels import decode as dec
    dtype, B, Hq, Hkv, d, cap, page = torch.bfloat16, 3, 8, 2, 128, 4096, 16
    gen = make_gen(seed_for("decode-trace", paged))
    kc, vc, bt = _random_caches(gen, paged, B, cap, Hkv, d, page, dtype)
    q = _randn(gen, B, 1, Hq, d, dtype=dtype)
    lens = torch.tensor([cap, 1000, 0], dtype=torch.int32, device=DEVICE)
    want = tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt, return_softmax_lse=True)
    bufs = []
    real = dec.launch

    def launch(kernel, grid, args, kwargs, *rest, **opts):
        if kernel is dec._decode_split_kernel:
            bufs.append(torch.full((grid[0] * grid[1] * grid[2], 4), -1, dtype=torch.int64, device=DEVICE))
            kwargs = dict(kwargs, TRACE=bufs[-1])
        return real(kernel, grid, args, kwargs, *rest, **opts)
    monkeypatch.setattr(dec, "launch", launch)
    monkeypatch.setenv("TILEATTN_LAUNCH_PLANS", "0")
    got = tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt, return_softmax_lse=True)
    torch.cuda.synchronize()
    assert bufs, "the split kernel did not launch"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    t = bufs[-1].cpu()
    assert bool((t[:, 1] >= t[:, 0]).all()) and bool((t[:, 0] > 0).all()) and bool((t[:, 2] >= 0).all())
    assert int(t[:, 3].sum()) == Hkv * int(lens.sum())  # each (batch, KV head)'s keys, over its splits
