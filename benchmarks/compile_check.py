"""Compile every kernel variant for sm90 (and sm80) on a machine without a GPU; print registers and spills.

Usage: PYTHONPATH=src python benchmarks/compile_check.py   (needs triton's bundled ptxas; no GPU, no interpreter)
Catches compile errors the interpreter can't see (e.g. non-constexpr globals) and shows register pressure.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tileattn import configs
from tileattn.kernels.backward import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess
from tileattn.kernels.forward import _fwd_kernel


def sig(fn, ptr_names, dtype):
    s = {}
    for name in fn.arg_names:
        if name in ptr_names:
            s[name] = f"*{dtype}"
        elif name == "qk_scale" or name == "sm_scale":
            s[name] = "fp32"
        elif name.isupper() and name not in ptr_names:
            s[name] = "constexpr"
        else:
            s[name] = "i32"
    return s


def compile_one(fn, ptrs, dtype, constants, cfg, arch):
    s = sig(fn, ptrs, dtype)
    for name in ("LSE", "DELTA", "DLSE"):
        if name in s:
            s[name] = "*fp32"
    src = ASTSource(fn=fn, signature=s, constexprs=constants)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return _ptxas_report(k.asm["ptx"], arch), k.metadata.shared


def _ptxas_report(ptx: str, arch: int) -> str:
    """Registers and spill bytes from ptxas -v (triton's bundled ptxas)."""
    import os, re, subprocess, tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    p = get_ptxas(arch)
    ptxas = getattr(p, "path", p)
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.ptx")
        open(f, "w").write(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        r = subprocess.run([ptxas, "-v", f"-arch={sm}", f, "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
    txt = r.stderr
    regs = re.search(r"Used (\d+) registers", txt)
    spill = re.search(r"(\d+) bytes spill stores", txt)
    return f"regs {regs.group(1) if regs else '?'} spill_stores {spill.group(1) if spill else '?'}"


def main():
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    bad = 0
    for dtype, tdt in (("bf16", "bf16"),):
        for block_d in (16, 32, 64, 128, 256):
            for causal in (False, True):
                import torch
                fc = configs._table_fwd(arch, block_d, causal)
                bc = configs._table_bwd(arch, block_d, causal)
                common = {"BLOCK_D": block_d, "EVEN_D": True, "CAUSAL": causal, "FP32": False}
                rows = [
                    ("fwd", _fwd_kernel, ("Q", "K", "V", "O", "LSE"), {**common, "BLOCK_M": fc.block_m, "BLOCK_N": fc.block_n}, fc),
                    ("dkdv", _bwd_dkdv_kernel, ("Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV"),
                     {**common, "BLOCK_M": bc.dkdv.block_m, "BLOCK_N": bc.dkdv.block_n}, bc.dkdv),
                    ("dq", _bwd_dq_kernel, ("Q", "K", "V", "DO", "LSE", "DELTA", "DQ"),
                     {**common, "BLOCK_M": bc.dq.block_m, "BLOCK_N": bc.dq.block_n}, bc.dq),
                ]
                for name, fn, ptrs, consts, cfg in rows:
                    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
                    try:
                        rep, smem = compile_one(fn, ptrs, tdt, consts, cfg, arch)
                        flag = "" if rep.endswith(" 0") else "  SPILLS"
                        print(f"sm{arch} {dtype} D{block_d:<3} causal={causal!s:5} {name:4} {tuple(cfg.__dict__.values())}: {rep} smem {smem}{flag}")
                    except Exception as e:  # noqa: BLE001
                        bad += 1
                        print(f"sm{arch} {dtype} D{block_d} causal={causal} {name}: FAILED {str(e)[:300]}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
