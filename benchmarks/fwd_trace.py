"""Per-item traces of the Hopper persistent forward (GPU): where an item's time goes, in particular its fixed cost
beside the key tiles (the short-sequence cells' gap to cuDNN).

Each consumer warpgroup of each item writes seven int64 through the kernel's TRACE buffer
(``gluon_forward._consumer``, ``gluon_common.trace_stamp``, %globaltimer: one clock on every SM): entry, Q ready,
first S done, last P V done, epilogue issued, its key tiles n, and (in the epilogue) the residual staged. Per cell
(bf16, flash-attn's grid: 16k tokens, model dim 2048; a training forward, residual stored, as the grid times it)
this prints the forward's µs with and without the trace (its perturbation), the kernel's span, and per item
(warpgroup 0; medians over items): Q wait (entry -> Q ready), first tile (Q ready -> first S), the loop (first S ->
last P V) per further tile, the epilogue (last P V -> issued; split at the residual staged: after it, at D=256, the
residual's store drains), the gap between one item's end and the next item's entry on the same warpgroup, and the
item's fixed cost: its time less n loop-tile times, also in tile-times (the loop spans n - 1 tiles plus the last P
V, so at small n its per-tile figure reads high and the fixed cost low: take a long cell's per-tile figure as the
tile time there); Q wait and epilogue also for even / odd programs apart. With ``--stagger`` each cell runs again
with ``TILEATTN_GLUON_FWD_STAGGER`` = half the measured item time (odd programs start late, so item boundaries
alternate between the two halves of the programs): if the epilogue's stores and the next Q's load are slow because
every SM issues them at once (HBM-bound bursts), their times drop. Three traced launches per cell (the first
compiles); the last counts. Only persistent calls get a trace (the launch's PERSISTENT; not FLAT).

Usage: PYTHONPATH=src python3 benchmarks/fwd_trace.py [--cells 128,1024,0;256,1024,0,infer] [--stagger]
       [--out DIR]     a cell: head_dim,seqlen,causal[,infer] (infer: inputs without grad, so no residual)
"""
import argparse
import os

import torch
import triton

os.environ["TILEATTN_LAUNCH_PLANS"] = "0"  # every call through gluon_forward.launch (a plan would replay)

import tileattn  # noqa: E402
from trace_launch import extra_kwargs  # noqa: E402
from tileattn.kernels import gluon_common, gluon_forward  # noqa: E402

FIELDS = gluon_common.TRACE_FIELDS.value  # entry, Q ready, first S, last P V, end, key tiles, residual staged

CELLS = "128,1024,0;128,16384,0;256,1024,0;256,16384,0;64,1024,1;64,1024,0"


def _persistent(kwargs):
    """Whether a forward launch's kwargs are the persistent grid's that take a trace (not FLAT)."""
    return kwargs.get("PERSISTENT") and not kwargs.get("FLAT")


def traced(fn):
    """Run ``fn`` with the persistent forward's launches given a fresh trace buffer; the (num_items, NW, 7) int64
    buffer of the last one and its program count ((None, 0) if no persistent launch happened)."""
    got = []

    def extra(grid, kwargs):
        if not _persistent(kwargs):
            return None
        got.append((torch.full((kwargs["num_items"], kwargs.get("NUM_WG", 2), FIELDS), -1, dtype=torch.int64,
                               device="cuda"), grid[0]))
        return {"TRACE": got[-1][0]}
    with extra_kwargs(gluon_forward, gluon_forward._fwd_kernel, extra):
        fn()
        torch.cuda.synchronize()
    return got[-1] if got else (None, 0)


def summary(buf, nprog):
    """The cell's numbers from one launch's trace (see the module docstring), in µs unless named."""
    t = buf.cpu().double()
    assert bool((t[..., 4] >= t[..., 0]).all()), "an item did not write its trace"
    stamps = [0, 1, 2, 3, 4, 6]
    base = t[..., stamps].min()
    t[..., stamps] -= base
    w0 = t[:, 0]
    n = w0[:, 5]
    total = w0[:, 4] - w0[:, 0]
    items = torch.arange(len(t))
    gaps = []
    for p in range(nprog):  # program p ran items p, p + nprog, ... in that order
        mine = w0[items % nprog == p]
        if len(mine) > 1:
            gaps.append(mine[1:, 0] - mine[:-1, 4])
    gap = torch.cat(gaps).median().item() if gaps else 0.0
    more = (n > 1)
    loop = ((w0[more, 3] - w0[more, 2]) / (n[more] - 1)).median().item() if more.any() else 0.0
    fixed = (total - n * loop).median().item()
    q_wait, epi, r_out = w0[:, 1] - w0[:, 0], w0[:, 4] - w0[:, 3], w0[:, 4] - w0[:, 6]
    odd = (items % nprog) % 2 == 1
    med = lambda x: x.median().item() / 1e3 if len(x) else float("nan")  # noqa: E731
    return dict(items=len(t), span=float(t[..., 4].max()) / 1e3, item=med(total), tiles=n.mean().item(),
                q_wait=med(q_wait), first=med(w0[:, 2] - w0[:, 1]), loop_per_tile=loop / 1e3, epilogue=med(epi),
                gap=gap / 1e3, fixed=fixed / 1e3, fixed_tiles=fixed / loop if loop else float("nan"),
                wg_skew=med(t[:, -1, 0] - t[:, 0, 0]), q_even=med(q_wait[~odd]), q_odd=med(q_wait[odd]),
                epi_even=med(epi[~odd]), epi_odd=med(epi[odd]), staged=med(w0[:, 6] - w0[:, 3]), r_out=med(r_out),
                r_even=med(r_out[~odd]), r_odd=med(r_out[odd]))


def cell_trace(fwd, label, out=""):
    """Time ``fwd`` plain and traced, trace it, print the summary line; returns the summary (None: no
    persistent launch)."""
    plain = triton.testing.do_bench(fwd, return_mode="median") * 1e3
    for _ in range(3):
        buf, nprog = traced(fwd)
    if buf is None:
        print(f"{label}: not a persistent launch", flush=True)
        return None
    with extra_kwargs(gluon_forward, gluon_forward._fwd_kernel,
                      lambda grid, kwargs: {"TRACE": buf} if _persistent(kwargs) else None):
        with_trace = triton.testing.do_bench(fwd, return_mode="median") * 1e3
    r = summary(buf, nprog)
    print(f"{label}: fwd {plain:.1f} us (traced {with_trace:.1f}), span {r['span']:.1f}, {r['items']} items on "
          f"{nprog} programs, {r['tiles']:.1f} tiles/item | item {r['item']:.2f} = Q wait {r['q_wait']:.2f} + "
          f"first tile {r['first']:.2f} + loop {r['loop_per_tile']:.3f}/tile + epilogue {r['epilogue']:.2f} (to the "
          f"residual staged {r['staged']:.2f}, then {r['r_out']:.2f}); gap "
          f"to next item {r['gap']:.2f}; fixed {r['fixed']:.2f} ({r['fixed_tiles']:.2f} tile-times); last-vs-first "
          f"warpgroup entry {r['wg_skew']:.2f}; even / odd programs: Q wait {r['q_even']:.2f} / {r['q_odd']:.2f}, "
          f"epilogue {r['epi_even']:.2f} / {r['epi_odd']:.2f}, after the residual staged {r['r_even']:.2f} / "
          f"{r['r_odd']:.2f}", flush=True)
    if out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        torch.save(buf.cpu(), out + ".pt")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=CELLS)
    ap.add_argument("--out", default="", help="a directory for the raw traces (.pt)")
    ap.add_argument("--stagger", action="store_true", help="each cell again with the odd programs started half an "
                    "item late (TILEATTN_GLUON_FWD_STAGGER)")
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}: persistent Gluon forward, per-item trace (warpgroup 0, means; µs)")
    for cell in a.cells.split(";"):
        fields = cell.split(",")
        d, s, causal = (int(x) for x in fields[:3])
        infer = fields[3:] == ["infer"]
        batch, heads = 16384 // s, 2048 // d
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, s, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                   .requires_grad_(not infer) for _ in range(3))

        def fwd():
            return tileattn.attention(q, k, v, causal=bool(causal))
        name = f"d{d}_s{s}_c{causal}" + ("_infer" if infer else "")
        r = cell_trace(fwd, f"D={d} S={s} causal={causal}" + (" (no grad: no residual)" if infer else ""),
                       a.out and os.path.join(a.out, name))
        if r is not None and a.stagger:
            ns = int(r["item"] * 500)  # half an item, in ns
            os.environ["TILEATTN_GLUON_FWD_STAGGER"] = str(ns)
            try:
                cell_trace(fwd, f"  stagger {ns} ns", a.out and os.path.join(a.out, name + "_stagger"))
            finally:
                del os.environ["TILEATTN_GLUON_FWD_STAGGER"]
        q = k = v = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
