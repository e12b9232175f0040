"""Helpers for the feature / varlen / flash-API tests (test_features.py, test_varlen.py, test_flash_api.py).

Builds on tests/_helpers.py (same accuracy rule, same atol floors, same NaN poisoning), generalised to:
any set of differentiable inputs (q, k, v, packed qkv / kv, sink), packed gradients split into their
components, lse of any layout ((B, H, Sq) batched, (H, total_q) varlen), and a per-sequence varlen reference.

Rule (flash-attn's): ``max|ours - ref64| <= MULT * max|pt - ref64| + atol``; MULT = 2 for out / lse,
3 for every gradient (dq, dk, dv and d(sink)). ``pt`` is the same reference computed at the input dtype
(``attention_ref(..., upcast=False)``). atol floors as in _helpers (one rounding at the natural scale).
"""

import contextlib

import torch

from _helpers import (
    BWD_MULT,
    DEVICE,
    FWD_MULT,
    _max_abs,
    atol_for,
    check_lse,
    check_rule,
    poisoned_empty,
)
from tileattn.reference import attention_ref


def rand(shape, dtype, gen, *, scale=1.0, requires_grad=False, device=DEVICE):
    """Seeded normal tensor (drawn on CPU, then moved: CPU and GPU runs see the same values), as a leaf."""
    x = (torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)
    return x.requires_grad_(requires_grad)


def uniform(shape, gen, lo, hi, *, dtype=torch.float32, device=DEVICE):
    return (lo + (hi - lo) * torch.rand(tuple(shape), generator=gen, dtype=torch.float32)).to(dtype).to(device)


def _detached_leaves(leaves, requires_grad):
    return {n: (t.detach().requires_grad_(requires_grad and t.requires_grad) if isinstance(t, torch.Tensor)
                else t) for n, t in leaves.items()}


def _grads(out, lse, inputs, dout, dlse):
    outputs, grad_outputs = [out], [dout.to(out.dtype)]
    if dlse is not None:
        outputs.append(lse)
        grad_outputs.append(dlse.to(lse.dtype))
    gs = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def _split(name, g, split):
    """A packed gradient -> its named components (dq, dk, dv); a plain one -> [('d' + name, g)]."""
    if name in split:
        return list(zip(split[name], g.unbind(-3)))
    return [("d" + name, g)]


def check_call(ours, ref, leaves, *, dtype, dout=None, dlse=None, split=None, v_scale=None, ctx="",
               poison=True):
    """Apply the accuracy rule to ``ours(**leaves)`` against ``ref(upcast, **leaves)``.

    ours: callable returning (out, lse) (any layout; lse float32). ref: callable (upcast, **leaves) returning
    (out, lse) from ``attention_ref`` (float64 with upcast, input dtype without). leaves: name -> tensor
    (tensors with requires_grad get their gradient checked when ``dout`` is given) or any other argument.
    split: {leaf name: component names} for packed leaves, e.g. {"qkv": ("dq", "dk", "dv")}: the packed
    gradient must have the packed shape and each component is checked on its own.
    v_scale: natural magnitude of out (max|v|) for the atol floor.
    Returns dict name -> (err, err_pt), plus "_ours" -> (out, lse, grads) for further checks.
    """
    split = split or {}
    grad_names = [n for n, t in leaves.items() if isinstance(t, torch.Tensor) and t.requires_grad] \
        if dout is not None else []
    pctx = poisoned_empty() if poison else contextlib.nullcontext()
    with pctx:
        out, lse = ours(**leaves)
        grads = _grads(out, lse, [leaves[n] for n in grad_names], dout, dlse) if grad_names else []
    results = {}
    refs = {}
    for upcast in (True, False):
        ls = _detached_leaves(leaves, bool(grad_names))
        with torch.enable_grad():
            o, l_ = ref(upcast, **ls)
            gs = _grads(o, l_, [ls[n] for n in grad_names], dout, dlse) if grad_names else []
        refs[upcast] = (o.detach(), l_.detach(), gs)
    (out_ref, lse_ref, g_ref), (out_pt, lse_pt, g_pt) = refs[True], refs[False]

    assert out.dtype == dtype, f"out dtype {out.dtype} != {dtype} {ctx}"
    if v_scale is None:
        v_scale = _max_abs(out_ref)
    results["out"] = check_rule("out", out, out_ref, out_pt, FWD_MULT, atol_for(dtype, out_ref, v_scale), ctx)
    results["lse"] = check_lse(lse, lse_ref, lse_pt, ctx)

    # Rows that see no key (and have no sink): out exactly 0.
    empty = torch.isneginf(lse_ref)
    rows = empty.transpose(1, 2) if out.dim() == 4 else empty.transpose(0, 1)
    if rows.any():
        assert (out[rows] == 0).all(), f"out not exactly 0 on rows with no visible key {ctx}"

    if grad_names:
        comps, comps_ref, comps_pt = [], [], []
        for n, g, gr, gp in zip(grad_names, grads, g_ref, g_pt):
            x = leaves[n]
            assert g.shape == x.shape, f"d{n}: shape {tuple(g.shape)} != {tuple(x.shape)} {ctx}"
            assert g.dtype == x.dtype, f"d{n}: dtype {g.dtype} != {x.dtype} {ctx}"
            comps += _split(n, g, split)
            comps_ref += _split(n, gr, split)
            comps_pt += _split(n, gp, split)
        qkv_scale = max([_max_abs(gr) for (name, gr) in comps_ref if name != "dsink"] + [0.0])
        for (name, g), (_, gr), (_, gp) in zip(comps, comps_ref, comps_pt):
            scale = _max_abs(gr) if name == "dsink" else qkv_scale
            results[name] = check_rule(name, g, gr, gp, BWD_MULT, atol_for(dtype, gr, scale), ctx)
        if rows.any() and "dq" in [c[0] for c in comps]:
            dq = dict(comps)["dq"]
            assert (dq[rows] == 0).all(), f"dq not exactly 0 on rows with no visible key {ctx}"
    results["_ours"] = (out, lse, dict(comps) if grad_names else {})
    return results


# ----------------------------------------------------------------------------------------- varlen
def seqlens_to_cu(lens, device=DEVICE):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def varlen_ref(upcast, q, k, v, cu_q, cu_k, *, alibi_slopes=None, dropout_mask=None, **kw):
    """Reference for (total, H, D) varlen tensors: attention_ref on each sequence's slice, concatenated.

    Returns out (total_q, H, Dv) and lse (H, total_q). ``dropout_mask`` (B, H, max_q, max_k): sequence b
    uses the top-left (len_q_b, len_k_b) corner of mask[b]. ``alibi_slopes`` (H,) or (B, H).
    """
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b]:cq[b + 1]][None], k[ck[b]:ck[b + 1]][None], v[ck[b]:ck[b + 1]][None]
        extra = {}
        if alibi_slopes is not None:
            extra["alibi_slopes"] = alibi_slopes[b:b + 1] if alibi_slopes.dim() == 2 else alibi_slopes
        if dropout_mask is not None:
            extra["dropout_mask"] = dropout_mask[b:b + 1, :, :qs.shape[1], :ks.shape[1]]
        o, l_ = attention_ref(qs, ks, vs, upcast=upcast, **extra, **kw)
        outs.append(o[0])
        lses.append(l_[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)
