"""Does Triton's Hopper warp-specialization pass (nvgpu-warp-specialization, triton 3.6) split a flash-attention
forward loop into producer/consumer partitions? Compiles a minimal tutorial-like forward for sm_90a on a machine
without a GPU and prints, per variant: compile result, ttg.warp_specialize partitions in the TTGIR, setmaxnreg in
the SASS, and the HGMMA loops (benchmarks/sass_loops.py's statistics).

Usage: PYTHONPATH=src python benchmarks/ws_probe.py [--only NAME ...] [--dump DIR]

Variants (Q load / K,V loads / O store):
  dev:     on-device descriptors (tl.make_tensor_descriptor) for Q, K, V, O (the Triton tutorial's Hopper WS form)
  host:    host TensorDescriptors for Q, K, V, O
  host_qo_ptr: host descriptors for K, V; Q loaded and O stored through pointers (tileattn's forward)
  dev_qo_ptr:  on-device descriptors for K, V; Q and O through pointers
  host_o_ptr / dev_o_ptr: Q, K, V through (host / on-device) descriptors, O stored through pointers
each at BLOCK_M 128 and 64, num_warps 4 and 8; TAIL=1 adds a second (masked, unspecialised) key loop after the
specialised one, as tileattn's non-causal forward has for a partial last key tile.
"""
import argparse
import os
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(__file__))
import sass_loops as sl  # noqa: E402


@triton.jit
def _rows_desc(X, seqlen, stride_s, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """An on-device descriptor over the flattened (rows, HEAD_DIM) matrix, BLOCK rows per load."""
    return tl.make_tensor_descriptor(X, shape=[seqlen * 1024, HEAD_DIM], strides=[stride_s, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _probe_fwd(Q, K, V, O, LSE, seqlen, qk_scale, stride_s,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               DEV_DESC: tl.constexpr, Q_DESC: tl.constexpr, O_DESC: tl.constexpr, TAIL: tl.constexpr,
               WS: tl.constexpr):
    # Q, K, V, O: (rows, HEAD_DIM) of one flattened (batch * head * seq) matrix, as in the tutorial
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    y0 = off_hz * seqlen
    if DEV_DESC:
        k_desc = _rows_desc(K, seqlen, stride_s, BLOCK_N, HEAD_DIM)
        v_desc = _rows_desc(V, seqlen, stride_s, BLOCK_N, HEAD_DIM)
        q_desc = _rows_desc(Q, seqlen, stride_s, BLOCK_M, HEAD_DIM)
        o_desc = _rows_desc(O, seqlen, stride_s, BLOCK_M, HEAD_DIM)
    else:
        k_desc = K
        v_desc = V
        q_desc = Q
        o_desc = O
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if Q_DESC:
        q = q_desc.load([y0 + start_m * BLOCK_M, 0])
    else:
        q = tl.load(Q + (y0 + offs_m)[:, None] * stride_s + offs_d[None, :], mask=(offs_m < seqlen)[:, None])
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_hi = seqlen // BLOCK_N * BLOCK_N
    for start_n in tl.range(0, full_hi, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([y0 + start_n, 0])
        s = tl.dot(q, k.T)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([y0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    if TAIL:
        for start_n in tl.range(full_hi, seqlen, BLOCK_N, num_stages=1):
            k = k_desc.load([y0 + start_n, 0])
            s = tl.dot(q, k.T)
            cols = start_n + tl.arange(0, BLOCK_N)
            s = tl.where((cols < seqlen)[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = v_desc.load([y0 + start_n, 0])
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(LSE + off_hz * seqlen + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < seqlen)
    if O_DESC:
        o_desc.store([y0 + start_m * BLOCK_M, 0], acc.to(q.dtype))
    else:
        tl.store(O + (y0 + offs_m)[:, None] * stride_s + offs_d[None, :], acc.to(q.dtype),
                 mask=(offs_m < seqlen)[:, None])


VARIANTS = {"dev": (True, True, True), "host": (False, True, True), "host_qo_ptr": (False, False, False),
            "dev_qo_ptr": (True, False, False), "host_o_ptr": (False, True, False), "dev_o_ptr": (True, True, False)}


def compile_variant(dev, q_desc, o_desc, bm, bn, d, warps, stages, tail, ws):
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "seqlen": "i32",
           "qk_scale": "fp32", "stride_s": "i32"}
    if not dev:
        sig["K"] = f"tensordesc<bf16[{bn},{d}]>"
        sig["V"] = f"tensordesc<bf16[{bn},{d}]>"
        if q_desc:
            sig["Q"] = f"tensordesc<bf16[{bm},{d}]>"
        if o_desc:
            sig["O"] = f"tensordesc<bf16[{bm},{d}]>"
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "HEAD_DIM": d, "DEV_DESC": dev, "Q_DESC": q_desc, "O_DESC": o_desc,
              "TAIL": tail, "WS": ws}
    for c in consts:
        sig[c] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(_probe_fwd.arg_names)
             if n in ("Q", "K", "V", "O", "LSE", "stride_s") and sig[n].startswith(("*", "i32"))}
    return triton.compile(ASTSource(fn=_probe_fwd, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def summarize(k):
    ttgir = k.asm["ttgir"]
    parts = len(re.findall(r"^\s*partition\d+\(", ttgir, re.M))
    regs = re.search(r"requestedRegisters = array<i32: ([^>]*)>", ttgir)
    ws_warps = re.search(r"partitionNumWarps = array<i32: ([^>]*)>", ttgir)
    sass = sl._sass(k.asm["ptx"])
    maxreg = sorted({f"{kind.lower()} {int(n, 16)}" for kind, n in
                     re.findall(r"USETMAXREG\.(\w+)\.\w+ (?:\w+, )?(0x[0-9a-f]+)", sass)})
    out = [f"warp_specialize ops {ttgir.count('ttg.warp_specialize(')}, partitions {parts}"
           f" (num warps {ws_warps.group(1) if ws_warps else '-'}, requested regs {regs.group(1) if regs else '-'}),"
           f" kernel num_warps {k.metadata.num_warps}, smem {k.metadata.shared}, setmaxnreg {maxreg or 'none'}"]
    for i, body in enumerate(sl.loops(sass)):
        out.append(f"    loop {i}: {sl.describe(body)}")
    return out, ttgir, sass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append")
    ap.add_argument("--dump")
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    for name, (dev, q_desc, o_desc) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        for bm, bn, warps, stages, tail in ((128, 64, 4, 3, 0), (128, 64, 8, 3, 0), (64, 64, 4, 3, 0),
                                            (128, 128, 4, 2, 0), (128, 64, 4, 3, 1)):
            for ws in (False, True):
                tag = f"{name} bm{bm} bn{bn} w{warps} s{stages} tail{tail} ws{int(ws)}"
                try:
                    k = compile_variant(dev, q_desc, o_desc, bm, bn, args.head_dim, warps, stages, bool(tail), ws)
                except Exception as e:  # noqa: BLE001 - report and go on
                    msg = str(e).strip().splitlines()
                    print(f"{tag}: FAILED {type(e).__name__}: {msg[-1] if msg else ''}", flush=True)
                    continue
                lines, ttgir, sass = summarize(k)
                print(f"{tag}: {lines[0]}")
                for line in lines[1:]:
                    print(line)
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    base = os.path.join(args.dump, tag.replace(" ", "_"))
                    open(base + ".ttgir", "w").write(ttgir)
                    open(base + ".sass", "w").write(sass)
                sys.stdout.flush()


if __name__ == "__main__":
    main()
