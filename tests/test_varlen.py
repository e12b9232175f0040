"""Variable-length batches: flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func.

Every sequence is compared with the float64 reference on its own slice (so any attention across a sequence
boundary shows up), under flash-attn's accuracy rule (tests/_helpers.py): out, lse (H, total_q) and gradients
(dq, dk, dv, packed gradients, d(sink)). Sequence lengths include 0 and 1, q and k lengths differ per sequence;
causal, windows, softcap, ALiBi, sinks, dropout and GQA are mixed in.

CPU (Triton interpreter): sequences up to ~80 tokens, fp16 mostly. CUDA: up to 2k tokens, fp16 and bf16.
"""

import pytest
import torch

import tileattn
from _flash_helpers import check_call, rand, seqlens_to_cu, uniform, varlen_ref
from _helpers import _max_abs, DEVICE, HALF_DTYPES, LARGE, ON_GPU, dtype_id, make_gen, seed_for

if LARGE:
    HQ, D = 8, 128
    LENS_QK = ([177, 0, 1, 1024, 2000, 731], [1500, 5, 0, 1, 2048, 731])  # per-sequence (q lens, k lens)
    LENS_SAME = [1000, 1, 0, 2048, 333]  # qkv-packed: one cu_seqlens
    DTYPES = HALF_DTYPES
    MAX_RANDOM_LEN = 2048
else:
    HQ, D = 4, 32
    LENS_QK = ([17, 0, 1, 64, 45], [40, 5, 0, 1, 70])
    LENS_SAME = [33, 1, 0, 70, 12]
    DTYPES = [torch.float16]
    MAX_RANDOM_LEN = 80
HKVS = [HQ, HQ // 2, HQ // 4]


def _rng_fork():
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if ON_GPU else [])


def _random_lens(seed, n):
    """n (q, k) length pairs in [0, MAX_RANDOM_LEN], with a 0 and a 1 on each side, q != k mostly."""
    gen = make_gen(seed)
    lq = torch.randint(2, MAX_RANDOM_LEN + 1, (n,), generator=gen).tolist()
    lk = torch.randint(2, MAX_RANDOM_LEN + 1, (n,), generator=gen).tolist()
    lq[0], lk[1], lq[2], lk[3] = 0, 0, 1, 1
    return lq, lk


def _varlen_inputs(lens_q, lens_k, hkv, dtype, seed, *, dv=None, grad=True, qk_scale=1.0):
    gen = make_gen(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    dv = D if dv is None else dv
    q = rand((tq, HQ, D), dtype, gen, scale=qk_scale, requires_grad=grad)
    k = rand((tk, hkv, D), dtype, gen, scale=qk_scale, requires_grad=grad)
    v = rand((tk, hkv, dv), dtype, gen, requires_grad=grad)
    dout = rand((tq, HQ, dv), dtype, gen)
    dlse = rand((HQ, tq), torch.float32, gen)
    return q, k, v, dout, dlse, gen


def _check_varlen(q, k, v, lens_q, lens_k, dout, dlse, *, max_form="int", dropout_p=0.0, ctx="", **feat):
    """flash_attn_varlen_func vs the per-sequence reference. feat: causal, window_size, softcap,
    alibi_slopes, sink (a leaf: d(sink) is checked when it requires grad)."""
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    if max_form == "tensor":
        max_q, max_k = torch.tensor(max_q), torch.tensor(max_k)
    elif max_form == "larger":  # an upper bound, not the exact maximum, is all that is needed
        max_q, max_k = max_q + 5, max_k + 17
    leaves = {"q": q, "k": k, "v": v}
    if feat.get("sink") is not None:
        leaves["sink"] = feat.pop("sink")
    feat.pop("sink", None)
    state = {}

    def ours(q, k, v, sink=None):
        out, lse, mask = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p,
                                                         return_attn_probs=True, sink=sink, **feat)
        state["mask"] = mask
        if dropout_p:
            torch.manual_seed(4242)  # the backward must regenerate the forward's mask, not draw a new one
        return out, lse

    def ref(upcast, q, k, v, sink=None):
        mask = state["mask"] if dropout_p else None
        return varlen_ref(upcast, q, k, v, cu_q, cu_k, sink=sink, dropout_mask=mask, dropout_p=dropout_p, **feat)

    with _rng_fork():
        torch.manual_seed(99)
        res = check_call(ours, ref, leaves, dtype=q.dtype, dout=dout, dlse=dlse, v_scale=_max_abs(v),
                         ctx=f"[varlen {ctx} lens_q={lens_q} lens_k={lens_k} Hq={q.shape[1]} Hkv={k.shape[1]} "
                             f"D={q.shape[2]} Dv={v.shape[2]} {dtype_id(q.dtype)} p={dropout_p} {feat}]")
    out, lse, _ = res["_ours"]
    assert out.shape == (sum(lens_q), HQ, v.shape[2])
    assert lse.shape == (HQ, sum(lens_q)) and lse.dtype == torch.float32
    if dropout_p:
        m = state["mask"]
        assert m.dtype == torch.bool and m.shape == (len(lens_q), HQ, int(max_q), int(max_k))
    return res


# ---------------------------------------------------------------------------------- masks and GQA
VARLEN_CASES = [
    # (lens id, causal, window, hkv index, max_seqlen form)
    ("fixed", False, (-1, -1), 0, "int"),
    ("fixed", True, (-1, -1), 1, "tensor"),
    ("fixed", False, (7, 3), 2, "int"),
    ("fixed", True, (12, -1), 0, "larger"),
    ("random", False, (-1, -1), 2, "tensor"),
    ("random", True, (-1, -1), 1, "int"),
    ("random", False, (0, 0), 1, "int"),
    ("random", False, (-1, 4), 0, "int"),
]


def _lens(which, seed):
    return LENS_QK if which == "fixed" else _random_lens(seed, 6)


@pytest.mark.parametrize("which,causal,window,h,max_form", VARLEN_CASES,
                         ids=[f"{c[0]}-{'causal' if c[1] else 'full'}-w{c[2][0]}_{c[2][1]}-hkv{HKVS[c[3]]}-max_{c[4]}"
                              for c in VARLEN_CASES])
def test_varlen(which, causal, window, h, max_form):
    """Random lengths incl. 0 and 1, Sq != Sk per sequence; max_seqlen as int, 0-d tensor or an upper bound."""
    seed = seed_for("varlen", which, causal, window, h)
    lens_q, lens_k = _lens(which, seed)
    dtype = DTYPES[(h + causal) % len(DTYPES)]
    q, k, v, dout, dlse, _ = _varlen_inputs(lens_q, lens_k, HKVS[h], dtype, seed)
    _check_varlen(q, k, v, lens_q, lens_k, dout, dlse, max_form=max_form, causal=causal, window_size=window)


FEATURE_CASES = ["softcap", "alibi-head", "alibi-batch", "sink", "dv-differs", "all"]


@pytest.mark.parametrize("feature", FEATURE_CASES)
def test_varlen_features(feature):
    """softcap, ALiBi (H,) / (B, H) (slope b goes with sequence b), sinks with d(sink), d_qk != d_v, and all of
    them at once with a window, GQA and dropout."""
    seed = seed_for("varlen-feat", feature)
    lens_q, lens_k = LENS_QK
    causal = feature in ("alibi-batch", "sink", "all")
    dv = {"dv-differs": 24 if not LARGE else 192, "all": 48 if not LARGE else 64}.get(feature)
    hkv = HKVS[FEATURE_CASES.index(feature) % 3]
    dtype = DTYPES[FEATURE_CASES.index(feature) % len(DTYPES)]
    q, k, v, dout, dlse, gen = _varlen_inputs(lens_q, lens_k, hkv, dtype, seed, dv=dv,
                                              qk_scale=2.0 if feature in ("softcap", "all") else 1.0)
    batch = len(lens_q)
    feat = {"causal": causal}
    if feature in ("softcap", "all"):
        feat["softcap"] = 5.0
    if feature == "alibi-head":
        feat["alibi_slopes"] = uniform((HQ,), gen, 0.05, 0.5)
    if feature in ("alibi-batch", "all"):
        feat["alibi_slopes"] = uniform((batch, HQ), gen, 0.02, 0.6)
    if feature in ("sink", "all"):
        feat["sink"] = rand((HQ,), torch.float32, gen, scale=2.0).requires_grad_(True)
    if feature == "all":
        feat["window_size"] = (25, -1)
        feat["dropout_p"] = 0.15
    _check_varlen(q, k, v, lens_q, lens_k, dout, dlse, ctx=feature, **feat)


@pytest.mark.parametrize("which", ["some-k-empty", "all-k-empty"])
def test_varlen_sink_rows_without_keys(which):
    """Sequences with Sk == 0 (or rows before the causal diagonal) and a sink: lse == sink, out == 0, and
    d(sink) still right (it gets dlse of those rows)."""
    lens_q, lens_k = ([5, 9, 3], [0, 4, 6]) if which == "some-k-empty" else ([5, 9, 3], [0, 0, 0])
    q, k, v, dout, dlse, gen = _varlen_inputs(lens_q, lens_k, HQ // 2, DTYPES[0], seed_for("varlen-sink0", which))
    sink = rand((HQ,), torch.float32, gen, scale=2.0).requires_grad_(True)
    res = _check_varlen(q, k, v, lens_q, lens_k, dout, dlse, causal=True, sink=sink, ctx=which)
    out, lse, _ = res["_ours"]
    # empty rows: all of sequence 0, the first 5 rows of sequence 1 (every row when all k are empty)
    rows = torch.arange(10 if which == "some-k-empty" else sum(lens_q), device=DEVICE)
    torch.testing.assert_close(lse[:, rows], sink.detach()[:, None].expand(HQ, len(rows)),
                               rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    assert (out[rows] == 0).all()


@pytest.mark.parametrize("p,causal", [(0.2, False), (0.45, True)], ids=["p0.2-full", "p0.45-causal"])
def test_varlen_dropout(p, causal):
    """Sequence b uses the top-left (len_q, len_k) corner of S_dmask[b]; grads use the same mask."""
    lens_q, lens_k = ([9, 0, 1, 40, 23], [21, 4, 0, 1, 33]) if not LARGE else LENS_QK
    seed = seed_for("varlen-drop", p, causal)
    q, k, v, dout, dlse, _ = _varlen_inputs(lens_q, lens_k, HKVS[1 + causal], DTYPES[0], seed)
    _check_varlen(q, k, v, lens_q, lens_k, dout, dlse, dropout_p=p, causal=causal)


# --------------------------------------------------------------------------------------- packed
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_qkvpacked(causal):
    """qkv (total, 3, H, D), one cu_seqlens; the gradient is one packed (total, 3, H, D) tensor."""
    lens = LENS_SAME
    dtype = DTYPES[causal % len(DTYPES)]
    gen = make_gen(seed_for("varlen-qkv", causal))
    total = sum(lens)
    qkv = rand((total, 3, HQ, D), dtype, gen, requires_grad=True)
    dout = rand((total, HQ, D), dtype, gen)
    dlse = rand((HQ, total), torch.float32, gen)
    cu = seqlens_to_cu(lens)
    max_s = max(lens) if causal else torch.tensor(max(lens))
    window = (-1, -1) if causal else (20, 6)

    def ours(qkv):
        return tileattn.flash_attn_varlen_qkvpacked_func(qkv, cu, max_s, causal=causal, window_size=window,
                                                         return_attn_probs=True)[:2]

    def ref(upcast, qkv):
        q, k, v = qkv.unbind(1)
        return varlen_ref(upcast, q, k, v, cu, cu, causal=causal, window_size=window)

    res = check_call(ours, ref, {"qkv": qkv}, dtype=dtype, dout=dout, dlse=dlse, split={"qkv": ("dq", "dk", "dv")},
                     v_scale=_max_abs(qkv[:, 2]), ctx=f"[varlen qkvpacked lens={lens} causal={causal}]")
    out, lse, grads = res["_ours"]
    assert out.shape == (total, HQ, D) and lse.shape == (HQ, total)
    assert grads["dq"].shape == (total, HQ, D)
    if causal:  # plain loss.backward(): one packed .grad of the packed shape, equal to the autograd.grad one
        qkv.grad = None
        out = tileattn.flash_attn_varlen_qkvpacked_func(qkv, cu, max_s, causal=causal, window_size=window)
        out.backward(dout)
        assert qkv.grad is not None and qkv.grad.shape == qkv.shape
        assert torch.equal(qkv.grad.unbind(1)[2], grads["dv"])  # (dq, dk above also had a dlse part)


@pytest.mark.parametrize("h", [0, 2], ids=[f"hkv{HKVS[0]}", f"hkv{HKVS[2]}"])
def test_varlen_kvpacked(h):
    """q (total_q, Hq, D), kv (total_k, 2, Hkv, D); kv's gradient is one packed tensor."""
    lens_q, lens_k = LENS_QK
    dtype = DTYPES[h % len(DTYPES)]
    hkv = HKVS[h]
    gen = make_gen(seed_for("varlen-kv", h))
    tq, tk = sum(lens_q), sum(lens_k)
    q = rand((tq, HQ, D), dtype, gen, requires_grad=True)
    kv = rand((tk, 2, hkv, D), dtype, gen, requires_grad=True)
    dout = rand((tq, HQ, D), dtype, gen)
    dlse = rand((HQ, tq), torch.float32, gen)
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    causal = h == 2

    def ours(q, kv):
        return tileattn.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lens_q), torch.tensor(max(lens_k)),
                                                        causal=causal, return_attn_probs=True)[:2]

    def ref(upcast, q, kv):
        k, v = kv.unbind(1)
        return varlen_ref(upcast, q, k, v, cu_q, cu_k, causal=causal)

    res = check_call(ours, ref, {"q": q, "kv": kv}, dtype=dtype, dout=dout, dlse=dlse, split={"kv": ("dk", "dv")},
                     v_scale=_max_abs(kv[:, 1]), ctx=f"[varlen kvpacked hkv={hkv} causal={causal}]")
    assert res["_ours"][0].shape == (tq, HQ, D)


# ------------------------------------------------------------------------------------ boundaries
def test_no_attention_across_sequences():
    """Changing one sequence's q/k/v leaves every other sequence's out and lse bit-identical."""
    lens_q, lens_k = LENS_QK
    q, k, v, _, _, gen = _varlen_inputs(lens_q, lens_k, HQ // 2, DTYPES[0], seed_for("boundary"), grad=False)
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    out, lse, _ = tileattn.flash_attn_varlen_func(q, k, v, *args, return_attn_probs=True)
    b = 3  # q len 64 (CPU), k len 1
    qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[qs] = rand(q2[qs].shape, q.dtype, gen) * 3
    k2[ks] = rand(k2[ks].shape, k.dtype, gen) * 3
    v2[ks] = rand(v2[ks].shape, v.dtype, gen) * 100
    out2, lse2, _ = tileattn.flash_attn_varlen_func(q2, k2, v2, *args, return_attn_probs=True)
    others = torch.ones(q.shape[0], dtype=torch.bool, device=DEVICE)
    others[qs] = False
    assert torch.equal(out[others], out2[others]) and torch.equal(lse[:, others], lse2[:, others])
    assert not torch.equal(out[qs], out2[qs])


def test_max_seqlen_forms_identical():
    """max_seqlen as int, 0-d int tensor, 1-element tensor, or a larger bound: bit-identical results."""
    lens_q, lens_k = LENS_QK
    q, k, v, _, _, _ = _varlen_inputs(lens_q, lens_k, HQ // 4, DTYPES[0], seed_for("maxforms"), grad=False)
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    mq, mk = max(lens_q), max(lens_k)
    base = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=True)
    for fq, fk in [(torch.tensor(mq), torch.tensor(mk)), (torch.tensor([mq], dtype=torch.int32), mk),
                   (torch.tensor(mq, device=DEVICE), torch.tensor(mk, device=DEVICE)), (mq + 3, mk + 40)]:
        out = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, fq, fk, causal=True)
        assert torch.equal(out, base), f"max_seqlen forms {fq!r}, {fk!r}"


def test_rows_outside_sequences():
    """cu_seqlens may end before the last row: those rows get zero gradients and the covered rows are unchanged."""
    lens_q, lens_k = [7, 20], [11, 3]
    pad_q, pad_k = 5, 4
    gen = make_gen(seed_for("outside"))
    dtype = DTYPES[0]
    tq, tk = sum(lens_q), sum(lens_k)
    q = rand((tq + pad_q, HQ, D), dtype, gen, requires_grad=True)
    k = rand((tk + pad_k, HQ // 2, D), dtype, gen, requires_grad=True)
    v = rand((tk + pad_k, HQ // 2, D), dtype, gen, requires_grad=True)
    dout = rand((tq + pad_q, HQ, D), dtype, gen)
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    out = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert (out[tq:] == 0).all()
    assert (dq[tq:] == 0).all() and (dk[tk:] == 0).all() and (dv[tk:] == 0).all()
    q0, k0, v0 = (x.detach()[:n].clone().requires_grad_(True) for x, n in ((q, tq), (k, tk), (v, tk)))
    out0 = tileattn.flash_attn_varlen_func(q0, k0, v0, cu_q, cu_k, max(lens_q), max(lens_k))
    g0 = torch.autograd.grad(out0, (q0, k0, v0), dout[:tq])
    assert torch.equal(out[:tq], out0)
    for g, gr in zip((dq[:tq], dk[:tk], dv[:tk]), g0):
        assert torch.equal(g, gr)


def test_rows_outside_after_in_place_cu_change():
    """Outputs and gradients skip their zero-fill only while cu_seqlens is known (host summary of this tensor
    version) to cover every row: after an in-place edit leaves rows outside, those rows are 0 / -inf again."""
    gen = make_gen(seed_for("outside-inplace"))
    dtype = DTYPES[0]
    q = rand((30, HQ, D), dtype, gen, requires_grad=True)
    k = rand((30, HQ // 2, D), dtype, gen, requires_grad=True)
    v = rand((30, HQ // 2, D), dtype, gen, requires_grad=True)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # covered: every row written by the kernels (and the allocator's blocks reused below)
        out, _, _ = tileattn.flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, return_attn_probs=True)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        del out
    with torch.no_grad():
        cu[2] = 25
    out, lse, _ = tileattn.flash_attn_varlen_func(q, k, v, cu, cu, 15, 15, return_attn_probs=True)
    assert (out[25:] == 0).all() and (lse[:, 25:] == float("-inf")).all() and torch.isfinite(out[:25]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert (dq[25:] == 0).all() and (dk[25:] == 0).all() and (dv[25:] == 0).all()


def test_all_sequences_empty():
    """total_q == 0 (every q sequence empty): empty out / lse; dk, dv exactly 0."""
    lens_q, lens_k = [0, 0], [3, 5]
    q, k, v, _, _, gen = _varlen_inputs(lens_q, lens_k, HQ, DTYPES[0], seed_for("allempty"))
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    out, lse, _ = tileattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 0, 5, return_attn_probs=True)
    assert out.shape == (0, HQ, D) and lse.shape == (HQ, 0)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.zeros_like(out))
    assert (dk == 0).all() and (dv == 0).all() and dq.shape == q.shape


def test_cu_seqlens_revalidated_after_in_place_change():
    """Validation results are cached per cu_seqlens tensor; an in-place edit must be checked again."""
    q = torch.randn(10, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    tileattn.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6)
    cu[1] = 12  # now decreasing: 12 > 10
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        tileattn.flash_attn_varlen_func(q, q, q, cu, cu, 12, 12)


def test_no_keys_with_sink_and_rows_outside_sequences():
    """All key sequences empty, a sink, and q rows past cu_seqlens_q[-1]: finite d(sink) = sum of dlse per head."""
    q = torch.randn(8, 2, 16, device=DEVICE)
    kv = torch.randn(0, 2, 16, device=DEVICE)
    sink = torch.zeros(2, device=DEVICE, requires_grad=True)
    cu_q = torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 0, 0], dtype=torch.int32, device=DEVICE)
    o, lse, _ = tileattn.flash_attn_varlen_func(q, kv, kv, cu_q, cu_k, 3, 0, sink=sink, return_attn_probs=True)
    assert torch.equal(o[6:], torch.zeros_like(o[6:])) and torch.isinf(lse[:, 6:]).all()
    (o[:6].sum() + lse[:, :6].sum()).backward()
    assert torch.allclose(sink.grad, torch.full((2,), 6.0, device=DEVICE))


# Paged K/V (flash_attn_varlen_func's block_table; forward only). The paged kernel differs from the packed one
# only in where it reads K/V rows, so with the same tiles its results must be bit-identical to the packed call
# (which the tests above hold to the rule against the float64 reference).
PAGE_SIZES = [16, 64, 256] if LARGE else [1, 16, 64]


def _paged_copy(k, v, lens_k, page, gen, extra_pages=2):
    """Scatter packed (total_k, Hkv, D) k/v into shuffled pages; returns the caches and the block table."""
    pages_per_seq = [max(1, -(-n // page)) + extra_pages for n in lens_k]
    max_pages = max(pages_per_seq)
    num_blocks = sum(pages_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    kc = rand((num_blocks, page) + tuple(k.shape[1:]), k.dtype, gen)  # garbage where no key is written
    vc = rand((num_blocks, page) + tuple(v.shape[1:]), v.dtype, gen)
    table = torch.zeros(len(lens_k), max_pages, dtype=torch.int32)
    start, used = 0, 0
    for b, n in enumerate(lens_k):
        blocks = order[used:used + pages_per_seq[b]]
        used += pages_per_seq[b]
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for j in range(n):
            kc[blocks[j // page], j % page] = k[start + j]
            vc[blocks[j // page], j % page] = v[start + j]
        start += n
    return kc, vc, table.to(k.device)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("page", PAGE_SIZES)
@pytest.mark.parametrize("case", ["plain", "causal-gqa", "all"])
def test_paged_kv(case, page, dtype, monkeypatch):
    """The paged form reads the same keys as the packed one: bit-identical results (both on the portable kernel:
    on Hopper the packed call would otherwise take the Gluon forward, which rounds differently)."""
    monkeypatch.setenv("TILEATTN_GLUON", "0")
    lens_q, lens_k = LENS_QK
    hkv = HQ if case == "plain" else HQ // 2
    seed = seed_for("varlen-paged", case, page, str(dtype))
    q, k, v, _, _, gen = _varlen_inputs(lens_q, lens_k, hkv, dtype, seed, grad=False)
    feat = {}
    if case != "plain":
        feat["causal"] = True
    if case == "all":
        feat.update(window_size=(37, 0), softcap=8.0, alibi_slopes=uniform((HQ,), gen, 0.1, 1.0),
                    sink=rand((HQ,), torch.float32, gen))
    kc, vc, table = _paged_copy(k, v, lens_k, page, gen)
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    out, lse, _ = tileattn.flash_attn_varlen_func(q, k, v, *args, return_attn_probs=True, **feat)
    out_p, lse_p, _ = tileattn.flash_attn_varlen_func(q, kc, vc, *args, return_attn_probs=True, block_table=table,
                                                      **feat)
    assert out_p.shape == out.shape and lse_p.shape == lse.shape
    assert torch.equal(out_p, out), (out_p.float() - out.float()).abs().max().item()
    assert torch.equal(lse_p, lse)


def test_paged_kv_bad_input():
    lens_q, lens_k = [3, 5], [7, 4]
    q, k, v, _, _, gen = _varlen_inputs(lens_q, lens_k, HQ, torch.float16, seed_for("varlen-paged-bad"), grad=False)
    kc, vc, table = _paged_copy(k, v, lens_k, 4, gen, extra_pages=0)
    args = (seqlens_to_cu(lens_q), seqlens_to_cu(lens_k), 5, 7)
    call = tileattn.flash_attn_varlen_func
    with pytest.raises(TypeError, match="block_table"):
        call(q, kc, vc, *args, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table entries must be in \[0, "):
        call(q, kc, vc, *args, block_table=table + kc.shape[0])
    with pytest.raises(ValueError, match=r"block_table must be \(batch=2, max_pages\)"):
        call(q, kc, vc, *args, block_table=table[:1])
    with pytest.raises(ValueError, match="exceeds the 8 keys"):
        call(q, kc, vc, args[0], args[1], 5, 9, block_table=table)
    with pytest.raises(ValueError, match=r"page size .* must be a power of two"):
        call(q, kc[:, :3], vc[:, :3], *args, block_table=table)
    with pytest.raises(ValueError, match="paged cache"):
        call(q, k, v, *args, block_table=table)
    with pytest.raises(ValueError, match="no backward"):
        call(q.detach().requires_grad_(), kc, vc, *args, block_table=table)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tile_map(causal):
    """The varlen forward's work list (_hostinfo.tile_map, TILEATTN_VARLEN_TILEMAP=1): exactly one entry
    (tile * batch + b) * heads + h per (query tile holding rows of sequence b, head h), none for empty sequences or
    past a sequence's end; sequences by decreasing work (key tiles visited), each sequence's entries contiguous,
    head by head, its tiles last-first when causal; with ``rounds`` (the persistent grid) every odd full round of
    that many entries reversed; None until both cu_seqlens were read on the host; rebuilt after an in-place
    change. Host-only: runs on the CPU."""
    from tileattn._hostinfo import host_summary, tile_map
    lens_q, lens_k = [130, 0, 1, 300, 64, 5], [40, 7, 0, 300, 500, 129]
    heads = 3
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    assert tile_map(cu_q, cu_k, 128, causal, heads) is None  # never read on the host
    host_summary(cu_q, "cu"), host_summary(cu_k, "cu")
    m = tile_map(cu_q, cu_k, 128, causal, heads)
    assert m.dtype == torch.int32 and m.device == cu_q.device
    batch = len(lens_q)
    got = [(int(e) // heads % batch, int(e) % heads, int(e) // heads // batch) for e in m]  # (b, h, tile)
    want = {(b, h, t) for b, n in enumerate(lens_q) for h in range(heads) for t in range(-(-n // 128))}
    assert sorted(got) == sorted(want) and len(got) == len(want)

    def work(b, t):
        nq, nk = lens_q[b], lens_k[b]
        hi = min(nk, max((t + 1) * 128 + nk - nq, 0)) if causal else nk
        return -(-hi // 128)
    order = []  # sequences in the order of their first entry; each one's entries contiguous
    for b, h, t in got:
        if not order or order[-1] != b:
            assert b not in order, "a sequence's entries are split"
            order.append(b)
    seq_work = [sum(work(b, t) for t in range(-(-lens_q[b] // 128))) for b in order]
    assert seq_work == sorted(seq_work, reverse=True), seq_work
    for b in order:  # per sequence: head by head, tiles longest first when causal (in order otherwise)
        mine = [(h, t) for bb, h, t in got if bb == b]
        tiles = list(range(-(-lens_q[b] // 128)))
        assert mine == [(h, t) for h in range(heads) for t in (tiles[::-1] if causal else tiles)]
    assert tile_map(cu_q, cu_k, 128, causal, heads) is m  # cached
    assert tile_map(cu_q, cu_k, 128, causal, 1) is not m  # per head count
    for rounds in (4, 5, m.numel(), m.numel() + 1):  # the persistent grid's order: odd full rounds reversed
        mr, want = tile_map(cu_q, cu_k, 128, causal, heads, rounds).tolist(), m.tolist()
        for r in range(1, len(want) // rounds, 2):
            want[r * rounds:(r + 1) * rounds] = want[r * rounds:(r + 1) * rounds][::-1]
        assert mr == want and (rounds >= m.numel() or mr != m.tolist())
    with torch.no_grad():
        cu_q[-1] += 200  # the last sequence grows: two more tiles
    host_summary(cu_q, "cu")
    m2 = tile_map(cu_q, cu_k, 128, causal, heads)
    assert m2 is not m and m2.numel() == m.numel() + heads


def test_keys_for_every_tile():
    """_hostinfo.keys_for_every_tile (the flat Gluon forward's varlen condition): every sequence with query rows
    has a key (and, with a causal mask or window, at least as many keys as queries); empty query sequences don't
    count; False until both cu_seqlens were read on the host. Host-only: runs on the CPU."""
    from tileattn._hostinfo import host_summary, keys_for_every_tile

    def check(lens_q, lens_k, diagonal):
        cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
        assert not keys_for_every_tile(cu_q, cu_k, diagonal)  # never read on the host
        host_summary(cu_q, "cu"), host_summary(cu_k, "cu")
        return keys_for_every_tile(cu_q, cu_k, diagonal)
    assert check([130, 0, 1, 300], [130, 0, 5, 300], True) and check([130, 0, 1], [1, 0, 1], False)
    assert not check([130, 0, 1], [129, 0, 1], True)  # a causal row past the keys' start sees nothing
    assert not check([130, 2, 1], [130, 0, 1], False)  # rows with no key at all
