"""Feature-cost benchmark (GPU): throughput per *useful* FLOP of varlen, sliding window, softcap, ALiBi and sinks,
against the dense kernel measured in the same run on the same card.

Usage: python -m tileattn.bench_features [--seqlens 2048,4096,8192] [--head-dim 128] [--cases dense,window,...]
       [--out-dir DIR]

Useful FLOPs count only visible (query, key) pairs: 4 * D * sum over heads and rows of the visible keys (fwd),
2.5x that for bwd (flash-attn's convention). Window (left, right) = (w, w) around the diagonal; varlen packs
sequences of random lengths (uniform in [S/4, S]) into the same total tokens as the dense run; varlen(equal) packs
`batch` sequences of length S, the dense run's own shape, so it shows what the varlen path itself costs (the
random-length case also pays for its shorter sequences).
"""

import argparse
import csv
import os
import time

import torch
import triton

TOTAL_TOKENS = 16384
MODEL_DIM = 2048


def _visible_pairs_window(s: int, left: int, right: int) -> int:
    i = torch.arange(s, dtype=torch.int64)
    lo = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + right).clamp(max=s - 1) if right >= 0 else torch.full_like(i, s - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def _bench(fn, grad_to_none=None) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median", grad_to_none=grad_to_none)


def _fwd_bwd_ms(call, inputs):
    out = call()
    dout = torch.randn_like(out)
    t_fwd = _bench(call)
    out = call()
    # grads reset between reps (as in tileattn.bench): otherwise every rep also adds into .grad (~140 us at 16k
    # tokens, D=128: 3 elementwise passes over q/k/v-sized tensors; benchmarks/kernel_profile.py)
    t_bwd = _bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=list(inputs))
    for t in inputs:
        t.grad = None
    return t_fwd, t_bwd


CASES = ("dense", "causal", "window", "softcap", "alibi", "alibi_causal", "sink", "varlen", "varlen_equal")


def run(seqlens, head_dim, dtype, out_dir, window, cases_wanted=CASES):
    import tileattn
    dev = torch.device("cuda")
    heads = MODEL_DIM // head_dim
    rows = []
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"head_dim {head_dim} | heads {heads} | {dtype}", flush=True)
    print(f"{'seqlen':>7} {'case':<16} {'fwd TF/s':>9} {'x dense':>8} {'bwd TF/s':>9} {'x dense':>8}", flush=True)
    for s in seqlens:
        batch = max(1, TOTAL_TOKENS // s)
        torch.manual_seed(0)
        mk = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)  # noqa: E731
        q, k, v = mk(batch, s, heads, head_dim), mk(batch, s, heads, head_dim), mk(batch, s, heads, head_dim)
        dense_pairs = batch * heads * s * s
        cases = []
        cases.append(("dense", lambda: tileattn.attention(q, k, v), dense_pairs, (q, k, v)))
        cases.append(("causal", lambda: tileattn.attention(q, k, v, causal=True),
                      batch * heads * _visible_pairs_window(s, -1, 0), (q, k, v)))
        w = window
        cases.append((f"window({w},{w})", lambda: tileattn.attention(q, k, v, window_size=(w, w)),
                      batch * heads * _visible_pairs_window(s, w, w), (q, k, v)))
        cases.append(("softcap", lambda: tileattn.attention(q, k, v, softcap=30.0), dense_pairs, (q, k, v)))
        slopes = torch.rand(heads, device=dev, dtype=torch.float32) * 0.1
        cases.append(("alibi", lambda: tileattn.attention(q, k, v, alibi_slopes=slopes), dense_pairs, (q, k, v)))
        cases.append(("alibi_causal", lambda: tileattn.attention(q, k, v, causal=True, alibi_slopes=slopes),
                      batch * heads * _visible_pairs_window(s, -1, 0), (q, k, v)))
        sink = torch.randn(heads, device=dev, dtype=torch.float32, requires_grad=True)
        cases.append(("sink", lambda: tileattn.attention(q, k, v, sink=sink), dense_pairs, (q, k, v, sink)))
        cu_eq = torch.arange(0, (batch + 1) * s, s, dtype=torch.int32, device=dev)
        qe, ke, ve = (x.detach().reshape(batch * s, heads, head_dim).clone().requires_grad_(True) for x in (q, k, v))
        cases.append(("varlen(equal)", lambda: tileattn.flash_attn_varlen_func(qe, ke, ve, cu_eq, cu_eq, s, s),
                      dense_pairs, (qe, ke, ve)))
        # varlen: random lengths in [s/4, s] packed into batch * s tokens
        g = torch.Generator().manual_seed(s)
        lens, total = [], 0
        while total < batch * s:
            n = int(torch.randint(s // 4, s + 1, (1,), generator=g))
            n = min(n, batch * s - total)
            lens.append(n)
            total += n
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
        qv, kv, vv = mk(total, heads, head_dim), mk(total, heads, head_dim), mk(total, heads, head_dim)
        cases.append((f"varlen({len(lens)} seqs)",
                      lambda: tileattn.flash_attn_varlen_func(qv, kv, vv, cu, cu, max(lens), max(lens)),
                      heads * sum(n * n for n in lens), (qv, kv, vv)))
        dense_rate = None
        for name, call, pairs, inputs in cases:
            key = name.split("(")[0] + ("_equal" if name == "varlen(equal)" else "")
            if key not in cases_wanted and name != "dense":  # dense is every ratio's denominator
                continue
            try:
                t_f, t_b = _fwd_bwd_ms(call, inputs)
                f_fwd = 4.0 * pairs * head_dim
                tf_f, tf_b = f_fwd / t_f * 1e-9, 2.5 * f_fwd / t_b * 1e-9
            except Exception as e:  # noqa: BLE001
                print(f"{s:>7} {name:<16} failed: {str(e)[:100]}", flush=True)
                continue
            if name == "dense":
                dense_rate = (tf_f, tf_b)
            rf, rb = tf_f / dense_rate[0], tf_b / dense_rate[1]
            print(f"{s:>7} {name:<16} {tf_f:9.1f} {rf:8.2f} {tf_b:9.1f} {rb:8.2f}", flush=True)
            rows.append(dict(case=name, seqlen=s, batch=batch, heads=heads, head_dim=head_dim,
                             fwd_ms=t_f, bwd_ms=t_b, fwd_tflops_useful=tf_f, bwd_tflops_useful=tf_b,
                             fwd_x_dense=rf, bwd_x_dense=rb, device=torch.cuda.get_device_name()))
        del q, k, v, qv, kv, vv, qe, ke, ve
        torch.cuda.empty_cache()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        name = torch.cuda.get_device_name().replace(" ", "_")
        path = os.path.join(out_dir, f"features_{name}_d{head_dim}.csv")
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            wr.writeheader()
            wr.writerows(rows)
        print(f"wrote {path}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", default="2048,4096,8192")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    ap.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_features needs a CUDA GPU")
        return 1
    t0 = time.time()
    run([int(x) for x in args.seqlens.split(",")], args.head_dim,
        torch.bfloat16 if args.dtype == "bf16" else torch.float16, args.out_dir, args.window,
        tuple(args.cases.split(",")))
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
