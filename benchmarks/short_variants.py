"""Short forward cells under knob variants, one process: each cell's forward (inputs requiring gradients, as the
bench's forward cells time it; --no-grad: under no_grad) replayed from a CUDA graph (10 calls per graph, no host
work between them), per variant, beside SDPA cuDNN's. Each provider's graph is captured once (the variant's knobs
set while capturing: they are read per call, configs.getenv, and launch plans key on the knobs a call read, so
switching os.environ between variants is safe), then timed in --rounds rounds (default 3), the order rotated each
round so that no variant always runs first or last on a power-capped card; each round takes a graph's best of 10
replays, and a cell reports each provider's median round and, with 2+ rounds, the spread of its rounds (max / min
- 1). Two identical kernels read 5-8% apart in run 180 when measured once each, one after the other.

A variant is NAME or NAME@DIMS:VAR=value[+VAR=value...], DIMS a '/'-separated list of head dims it applies to (all
when left out); a variant is skipped on cells of other head dims. The default (no knob) is always measured.
--step: forward and backward (the attention of a training step).
Usage: PYTHONPATH=src python3 benchmarks/short_variants.py [--no-grad] [--cells d,b,h,s,causal;...] VARIANT ..."""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tileattn

sys.path.insert(0, os.path.dirname(__file__))
from kernel_vs_wall import capture, replay_us  # noqa: E402

CELLS = ((128, 32, 16, 512, True), (128, 16, 16, 1024, True), (64, 32, 32, 512, True), (64, 16, 32, 1024, True),
         (256, 32, 8, 512, True), (256, 16, 8, 1024, True), (256, 32, 8, 512, False), (128, 32, 16, 512, False),
         (64, 32, 32, 512, False))


def parse_variant(text):
    name, _, knobs = text.partition(":")
    name, _, dims = name.partition("@")
    env = dict(kv.split("=", 1) for kv in knobs.split("+") if kv)
    return name, ({int(d) for d in dims.split("/")} if dims else None), env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-grad", action="store_true")
    ap.add_argument("--step", action="store_true", help="time forward + backward (a training step's attention)")
    ap.add_argument("--cells", default="")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per cell, order rotated each round")
    ap.add_argument("variants", nargs="*")
    args = ap.parse_args()
    grad = not args.no_grad or args.step
    cells = CELLS if not args.cells else [tuple(int(x) for x in c.split(",")) for c in args.cells.split(";")]
    variants = [("default", None, {})] + [parse_variant(v) for v in args.variants]
    print(f"# grad={grad} step={args.step} {torch.cuda.get_device_name()}: us per call, CUDA-graph replay; "
          f"ratio = cuDNN / variant (above 1: faster than cuDNN)")
    for d, b, h, s, causal in cells:
        causal = bool(causal)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
                   for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        do = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)

        def cud():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            if args.step:
                out.backward(do.transpose(1, 2))

        def ours():
            out = tileattn.attention(q, k, v, causal=causal)
            if args.step:
                out.backward(do)
        with torch.set_grad_enabled(grad):
            graphs, parts = {"cudnn": capture(cud)}, {}
            for name, dims, env in variants:
                if dims is not None and d not in dims:
                    continue
                saved = {key: os.environ.get(key) for key in env}
                os.environ.update(env)
                try:
                    graphs[name] = capture(ours)
                except Exception as e:  # a variant that does not apply to the cell (e.g. a config that won't fit)
                    parts[name] = f"{name} failed: {type(e).__name__}: {str(e)[:80]}"
                finally:
                    for key, value in saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
            times = rounds_us(graphs, args.rounds)
        ref = statistics.median(times["cudnn"])
        line = [f"cudnn {ref:.1f}{spread(times['cudnn'])}"]
        for name, _, _ in variants:
            if name in times:
                us = statistics.median(times[name])
                line.append(f"{name} {us:.1f} ({ref / us:.2f}){spread(times[name])}")
            elif name in parts:
                line.append(parts[name])
        print(f"D={d} B={b} H={h} S={s} causal={causal}: " + " | ".join(line), flush=True)
        del graphs
        torch.cuda.empty_cache()


def rounds_us(graphs, rounds):
    """{name: [µs per call, one per round]}: every graph timed once per round (``replay_us``), round r starting
    at the r-th graph of the list (a rotation)."""
    names = list(graphs)
    times = {name: [] for name in names}
    for r in range(max(1, rounds)):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            times[name].append(replay_us(graphs[name]))
    return times


def spread(values):
    """' ±x%' (max / min - 1 over the rounds) for 2+ rounds, else ''."""
    return f" ±{(max(values) / min(values) - 1) * 100:.1f}%" if len(values) > 1 else ""


if __name__ == "__main__":
    main()
