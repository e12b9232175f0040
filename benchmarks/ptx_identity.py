"""Fingerprints of the Gluon kernels' and the portable forward / dQ kernels' sm_90a PTX code (debug sections,
.loc/.file lines, comments, $L__tmp labels and the parameter list stripped, parameter numbers masked: a kernel that
gains an argument its variant never reads keeps its fingerprint), one line per variant: run it at two revisions and
diff the outputs to show that a change left the listed variants' code as it was (the CPU machine compiles; no GPU
needed).

Usage: PYTHONPATH=src python benchmarks/ptx_identity.py [--only fwd|bwd|dq|portable]
"""
import argparse
import hashlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gluon_compile as gc  # noqa: E402

FWD = [dict(d=128), dict(d=128, causal=True), dict(d=64), dict(d=256, causal=True),
       dict(d=128, causal=True, softcap=True, sink=True), dict(d=128, window=True), dict(d=128, fp16=True),
       dict(d=128, varlen=True), dict(d=128, causal=True, varlen=True, tile_map=True), dict(d=128, alibi=True),
       dict(d=128, softcap=2, persistent=True), dict(d=64, causal=True, softcap=2, sink=True)]
BWD = [dict(d=128), dict(d=128, causal=True), dict(d=64), dict(d=64, causal=True, fp16=True),
       dict(d=128, causal=True, varlen=True), dict(d=128, window=True), dict(d=128, softcap=True, alibi=True),
       dict(d=256), dict(d=256, causal=True)]
DQ = [dict(d=128), dict(d=128, causal=True), dict(d=128, dlse=True), dict(d=128, resid=False),
      dict(d=128, causal=True, varlen=True), dict(d=128, window=True), dict(d=128, softcap=True, alibi=True),
      dict(d=128, persistent=True), dict(d=128, causal=True, persistent=True)]


def normalised(ptx: str) -> str:
    ptx = ptx.split("\t.section\t.debug")[0]
    keep = []
    for line in ptx.splitlines():
        t = line.strip()
        if t.startswith((".loc", ".file", "//", ".param")) or "$L__tmp" in t:
            continue
        keep.append(re.sub(r"_param_\d+", "_param_N", line))
    return re.sub(r"[ \t]+", " ", "\n".join(keep))


PORTABLE_FEATURES = ("plain", "window", "sink+dropout+varlen")  # compile_check.FEATURES, at D=64 and 128


def portable_fingerprints():
    """The portable forward (128x64 tile, 8 warps) and dQ (64x64, 4 warps) kernels, bf16, residual kept, with
    compile_check's constexprs and the launcher's integer hints: (name, fingerprint) pairs."""
    import compile_check as cc
    from tileattn import configs
    from tileattn.kernels import backward, forward
    seen = []
    real = cc._ptxas_report
    cc._ptxas_report = lambda ptx, arch: seen.append(hashlib.sha256(normalised(ptx).encode()).hexdigest()[:16])
    try:
        for d in (64, 128):
            for feat in PORTABLE_FEATURES:
                c = dict(cc.launch_constexprs(d, **cc.FEATURES[feat]), BLOCK_M=128, BLOCK_N=64)
                cc.compile_one(forward._fwd_kernel, "bf16", c, configs.KernelConfig(128, 64, 8, 2), 90,
                               ints=cc.typical_ints(d))
                cc.compile_one(backward._bwd_dq_kernel, "bf16", dict(c, BLOCK_M=64),
                               configs.KernelConfig(64, 64, 4, 2), 90, ints=cc.typical_ints(d))
                yield f"portable fwd d={d} {feat}", seen[-2]
                yield f"portable dq d={d} {feat}", seen[-1]
    finally:
        cc._ptxas_report = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["fwd", "bwd", "dq", "portable"])
    a = ap.parse_args()
    if a.only in (None, "portable"):
        for name, fp in portable_fingerprints():
            print(name, fp, flush=True)
    for kind, cases, fn in (("fwd", FWD, gc.compile_fwd), ("bwd", BWD, gc.compile_bwd), ("dq", DQ, gc.compile_dq)):
        if a.only and a.only != kind:
            continue
        for kw in cases:
            ptx = fn(**kw).asm["ptx"]
            print(kind, " ".join(f"{k}={v}" for k, v in kw.items()),
                  hashlib.sha256(normalised(ptx).encode()).hexdigest()[:16], flush=True)


if __name__ == "__main__":
    main()
