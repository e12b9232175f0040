"""Per-program traces of the Hopper backward's kernels (GPU): where the dK/dV and dQ kernels' time goes, causal
against not.

Each program of a kernel writes (start ns, end ns, SM id, steps: query steps in dK/dV, key tiles in dQ) through
its TRACE buffer (``gluon_common.trace_program``, %globaltimer: one clock for every SM; the end read once the
warp-specialised partitions have joined). Per cell (bf16, flash-attn's grid: 16k
tokens, model dim 2048) this prints the kernel's span, the SMs' idle share inside it (before their first program,
between programs, after their last), the tail (the span after the first SM ran out of programs), and a least-squares
fit of a program's duration as fixed + per-step * steps, so causal's per-FLOP gap to non-causal splits into step cost,
program overhead and scheduling. Three traced launches per cell (the first compiles); the last counts.

Usage: PYTHONPATH=src python3 benchmarks/bwd_trace.py [--head-dims 128] [--seqlens 4096,16384] [--out DIR]"""
import argparse
import contextlib
import os

import torch

os.environ["TILEATTN_LAUNCH_PLANS"] = "0"  # every call through gluon_backward.launch (a plan would replay)

from bwd_fused import backward_cell  # noqa: E402
from tileattn.kernels import gluon_backward, gluon_dq  # noqa: E402
from trace_launch import extra_kwargs  # noqa: E402

KERNELS = {"dkdv": (gluon_backward, "_dkdv_kernel"), "dq": (gluon_dq, "_dq_kernel")}


def traced(fn):
    """Run ``fn`` with every dK/dV and Gluon dQ launch given a fresh trace buffer; returns {kernel name: the
    (programs, 4) int64 buffer of its last launch}."""
    bufs = {}
    with contextlib.ExitStack() as hooks:
        for name, (mod, attr) in KERNELS.items():
            def extra(grid, kwargs, name=name):
                bufs[name] = torch.full((grid[0], 4), -1, dtype=torch.int64, device="cuda")
                return {"TRACE": bufs[name]}
            hooks.enter_context(extra_kwargs(mod, getattr(mod, attr), extra))
        fn()
        torch.cuda.synchronize()
    return bufs


def summary(buf):
    """The cell's numbers from one kernel's trace (see the module docstring)."""
    t = buf.cpu().double()
    assert bool((t[:, 1] >= t[:, 0]).all()), "a program did not write its trace"
    t0, t1, sm, steps = t[:, 0], t[:, 1], t[:, 2].long(), t[:, 3]
    base = t0.min()
    t0, t1 = t0 - base, t1 - base
    span = float(t1.max())
    sms = int(sm.max()) + 1
    busy = torch.zeros(sms, dtype=torch.float64).index_add_(0, sm, t1 - t0)
    last_end = torch.full((sms,), 0.0, dtype=torch.float64).scatter_reduce_(0, sm, t1, "amax")
    dur = t1 - t0
    a = torch.stack([torch.ones_like(steps), steps], 1)
    fixed, per_step = torch.linalg.lstsq(a, dur[:, None]).solution[:, 0].tolist()
    resid = dur - (fixed + per_step * steps)
    return dict(programs=len(t), sms=sms, span_us=span / 1e3, idle=1 - float(busy.sum()) / (sms * span),
                tail_us=(span - float(last_end.min())) / 1e3, fixed_us=fixed / 1e3, per_step_ns=per_step,
                fit_rms_us=float(resid.pow(2).mean().sqrt()) / 1e3, steps=float(steps.sum()),
                max_per_sm=int(torch.bincount(sm).max()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="128")
    ap.add_argument("--seqlens", default="4096,16384")
    ap.add_argument("--out", default="", help="a directory for the raw traces (.pt)")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}: dK/dV and dQ kernel program traces, bf16, one process")
    print(f"{'D':>4} {'S':>6} {'mask':<7} {'kernel':<6} {'progs':>6} {'span us':>9} {'idle':>6} {'tail us':>8} "
          f"{'fixed us':>9} {'ns/step':>8} {'rms us':>7} {'steps':>9} {'ns/step*':>9}")
    for d, s in ((int(d), int(s)) for d in args.head_dims.split(",") for s in args.seqlens.split(",")):
        for causal in (False, True):
            ours, _, (q, k, v), _, _ = backward_cell(d, s, causal)
            for _ in range(3):  # all traced (one compile of the traced kernel); the last one counts
                bufs = traced(ours)
                q.grad = k.grad = v.grad = None
            mask = "causal" if causal else "full"
            if not bufs:
                print(f"{d:>4} {s:>6} {mask:<7} no Gluon backward launch traced")
            for name, buf in bufs.items():
                r = summary(buf)
                # ns/step*: the span over the steps of all programs, per SM (what a step costs the whole kernel)
                print(f"{d:>4} {s:>6} {mask:<7} {name:<6} {r['programs']:>6} {r['span_us']:>9.1f} {r['idle']:>6.3f} "
                      f"{r['tail_us']:>8.1f} {r['fixed_us']:>9.2f} {r['per_step_ns']:>8.1f} {r['fit_rms_us']:>7.2f} "
                      f"{r['steps']:>9.0f} {r['span_us'] * 1e3 * r['sms'] / r['steps']:>9.1f}", flush=True)
                if args.out:
                    os.makedirs(args.out, exist_ok=True)
                    torch.save(buf.cpu(), os.path.join(args.out, f"trace_{name}_d{d}_s{s}_{int(causal)}.pt"))


if __name__ == "__main__":
    main()
