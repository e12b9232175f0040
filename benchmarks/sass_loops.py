"""Per-loop SASS statistics of one kernel variant, compiled for sm_90a on a machine without a GPU.

Usage: PYTHONPATH=src python benchmarks/sass_loops.py fwd|dq|dkdv [--head-dim 128] [--config bm,bn,warps,stages]
           [--set NAME=VALUE ...] [--varlen] [--seqlen 4096] [--vs NAME=VALUE ...]

Builds the kernel like benchmarks/compile_check.py (the launcher's divisibility hints; the sm_90 table's tiles
unless --config), assembles it with Triton's bundled ptxas and disassembles it with cuobjdump, then prints each
loop that issues tensor-core instructions (a backward branch's span): its instruction count, HGMMA, local-memory
spills (LDL/STL), cp.async (LDGSTS), TMA loads, shared-memory loads/stores outside the matmuls (LDS/STS),
barriers. Spans can overlap when ptxas lays a loop out in pieces (mbarrier wait loops add backward branches). ``--varlen`` uses a varlen launch (IS_VARLEN, zero batch strides);
``--vs`` compiles a second variant with extra constexpr settings and prints the instruction-mix difference of
the two variants' main loops (the smallest loop with HGMMA: the unmasked full-tile loop; ``--loop i`` picks the
i-th loop in address order instead). This is how NOTES.md (session 6) found varlen's per-element predicates in dK/dV (744 vs 521
instructions per iteration) and the TMA merged loop's V round trip through registers.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import compile_check as cc  # noqa: E402
from tileattn import configs  # noqa: E402
from tileattn.kernels.backward import _bwd_dkdv_kernel, _bwd_dq_kernel  # noqa: E402
from tileattn.kernels.forward import _fwd_kernel  # noqa: E402

KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}


def _sass(ptx: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = getattr(get_ptxas(90), "path", get_ptxas(90))
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        src, obj = os.path.join(d, "k.ptx"), os.path.join(d, "k.o")
        open(src, "w").write(ptx)
        subprocess.run([ptxas, "-arch=sm_90a", src, "-o", obj], check=True, capture_output=True)
        return subprocess.run([cuobjdump, "-sass", obj], check=True, capture_output=True, text=True).stdout


def loops(sass: str):
    """[instructions of the loop body, as (address, text)] for loops containing HGMMA, in address order."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    found = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA\s+(?:\S+\s+)?(0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            body = ins[index[int(m.group(1), 16)]:i + 1]
            if any("HGMMA" in b for _, b in body):
                found.append(body)
    return sorted(found, key=lambda body: body[0][0])


PATTERNS = {"HGMMA": "HGMMA", "LDL": "LDL", "STL": "STL", "LDGSTS": "LDGSTS", "TMA": "UTMALDG",
            "LDS": r"\bLDS", "STS": r"\bSTS", "BAR": r"BAR\.|SYNCS"}


def describe(body) -> str:
    counts = {k: sum(1 for _, t in body if re.search(p, t)) for k, p in PATTERNS.items()}
    return f"{len(body)} instructions, " + ", ".join(f"{k} {v}" for k, v in counts.items())


def opcodes(body):
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in body)


def build(kind, head_dim, cfg, settings, varlen, seqlen):
    consts = cc.launch_constexprs(head_dim, **{"IS_VARLEN": varlen, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                                               **settings})
    ints = cc.typical_ints(head_dim, seqlen)
    if varlen:
        for name in list(ints):
            if re.fullmatch(r"stride_\w+b", name):
                ints[name] = 0
    captured = {}
    real = cc.triton.compile

    def keep(*a, **k):
        captured["k"] = real(*a, **k)
        return captured["k"]
    cc.triton.compile = keep
    try:
        report, smem = cc.compile_one(KERNELS[kind], "bf16", consts, cfg, 90, ints)
    finally:
        cc.triton.compile = real
    return report, smem, _sass(captured["k"].asm["ptx"])


def _settings(pairs):
    out = {}
    for p in pairs or []:
        name, value = p.split("=", 1)
        out[name] = {"1": True, "true": True, "0": False, "false": False}.get(value.lower(), None)
        if out[name] is None:
            out[name] = int(value)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=sorted(KERNELS))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--config", help="block_m,block_n,warps,stages (default: the sm_90 table's, non-causal "
                                     "unless --set HAS_RIGHT=1)")
    ap.add_argument("--set", action="append", help="constexpr NAME=VALUE (1/0 for flags)")
    ap.add_argument("--vs", action="append", help="a second variant: these settings on top of --set")
    ap.add_argument("--varlen", action="store_true")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--loop", type=int, help="compare the i-th HGMMA loop (address order) instead of the smallest")
    args = ap.parse_args()
    settings = _settings(args.set)
    causal = bool(settings.get("HAS_RIGHT"))
    if args.config:
        cfg = configs.KernelConfig(*(int(x) for x in args.config.split(",")))
    elif args.kernel == "fwd":
        cfg = configs._table_fwd(9, configs.padded_head_dim(args.head_dim), causal)
    else:
        bc = configs._table_bwd(9, configs.padded_head_dim(args.head_dim), causal)
        cfg = bc.dq if args.kernel == "dq" else bc.dkdv
    variants = [("base", settings)]
    if args.vs:
        variants.append(("vs", {**settings, **_settings(args.vs)}))
    main_loops = []
    for name, s in variants:
        report, smem, sass = build(args.kernel, args.head_dim, cfg, s, args.varlen, args.seqlen)
        print(f"{name}: {args.kernel} D={args.head_dim} {cfg} {s} varlen={args.varlen}: {report}, smem {smem}")
        found = loops(sass)
        for i, body in enumerate(found):
            print(f"  loop {i}: {describe(body)}")
        if found:
            main_loops.append(found[args.loop] if args.loop is not None else min(found, key=len))
    if len(main_loops) == 2:
        a, b = opcodes(main_loops[0]), opcodes(main_loops[1])
        print("main loops, opcode counts that differ (base -> vs):")
        for op in sorted(set(a) | set(b)):
            if a[op] != b[op]:
                print(f"  {op:28s} {a[op]:5d} -> {b[op]:5d}")


if __name__ == "__main__":
    main()
