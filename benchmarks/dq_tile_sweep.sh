#!/usr/bin/env bash
# Backward-only timings of candidate tiles (TILEATTN_BWD_CONFIG = dkdv tile, then dq tile), SDPA-flash as the
# anchor in the first invocation of each set. Usage: OUT=dir bash benchmarks/dq_tile_sweep.sh [run10|next]
#   run10: the set timed in session 3 (results/dq_tiles_h200_run10_*); next: D=128 causal dK/dV candidates
#   (ptxas, sm_90a, with the delta correction: 64x128x8x3 spills 132 B causal, 64x64x8x3 0 B, 32x128x8x3 48 B).
#   run12: D=128 causal around 32x128 (stages, warps; ptxas: 8w x 2 and x 4 stages spill nothing) and D=64 dK/dV
#   and dQ neighbours, at the cells closest to 1.0x FA2 (D=128 causal 1k; D=64 1k and 16k).
#   d256: D=256 pairs re-chosen by ptxas after the int32 index fix (not yet timed).
#   run20: D=128 causal dK/dV and D=256 pairs after the residual delta (the dQ kernel lost its PK matmul).
#   run22: D=256 dK/dV 32x64 with dQ 128x32 (left out of run 20), D=128 causal dQ 64x64x4x2.
set -u
OUT="${OUT:-gpu_logs}"
run() {  # head_dim providers dkdv dq tag [causal: both|true|false] [seqlens]
  TILEATTN_BWD_CONFIG="$3,$4" python3 -m tileattn.bench --head-dims "$1" --seqlens "${7:-1k,4k,16k}" --modes bwd \
    --causal "${6:-both}" --providers "$2" --out-dir "$OUT" --prefix "dq_$5" --no-plot --warmup 50 --rep 30 2>&1 \
    | grep -A12 "== bwd" | grep -v "^$"
}
# one head dim per helper: providers dkdv dq tag (C128_SEQLENS picks the D=128 causal seqlens of a set)
d256() { run 256 "$1" "$2" "$3" "d256_$4" both 1k,4k,16k; }
c128() { run 128 "$1" "$2" "$3" "d128c_$4" true "${C128_SEQLENS:-1k,4k}"; }
d64() { run 64 "$1" "$2" "$3" "d64_$4" both 1k,16k; }
if [ "${1:-run10}" = run22 ]; then  # not yet run: the D=256 pair run 20 left out, beside today's table
  d256 tileattn,sdpa_flash 64,32,8,2 128,32,8,2 table    # dK/dV 64x32 0 B, dQ 128x32 0 B
  d256 tileattn 32,64,8,2 128,32,8,2 dkdv32x64_dq128x32   # dK/dV 0 / 164 B causal
  d256 tileattn 64,32,8,3 128,32,8,2 dkdv64x32s3          # 180 regs, 0 B, 169 KB (ptxas, residual mode)
  d256 tileattn 64,32,8,2 128,32,8,3 dq128x32s3           # 236 regs, 0 B, 224 KB
  d256 tileattn 128,16,8,2 128,32,8,2 dkdv128x16          # 180 regs, 0 B
  c128 tileattn,sdpa_flash 32,64,4,2 128,64,8,3 table  # a window-only dQ candidate, on causal first
  c128 tileattn 32,64,4,2 64,64,4,2 dq64x64s2
  exit 0
fi
if [ "${1:-run10}" = run20 ]; then  # after the residual delta (no PK matmul in dQ); ptxas sm_90a in brackets
  C128_SEQLENS=1k,2k,4k,16k
  c128 tileattn,sdpa_flash 32,128,8,3 128,64,8,3 table   # dK/dV 226 regs 0 B
  c128 tileattn 64,128,8,3 128,64,8,3 dkdv64x128         # 200 B; window/causal features run 19: +10-16%
  c128 tileattn 32,64,4,2 128,64,8,3 dkdv32x64w4s2       # 16 B
  d256 tileattn,sdpa_flash 32,64,8,2 64,64,8,2 table     # dK/dV 0 / 164 B causal, dQ 0 B
  d256 tileattn 64,32,8,2 64,64,8,2 dkdv64x32            # dK/dV 176 regs 0 B
  d256 tileattn 64,32,8,2 64,32,8,2 dkdv64x32_dq64x32    # dQ 208 regs 0 B
  d256 tileattn 64,32,8,2 128,32,8,2 dkdv64x32_dq128x32  # dQ 236 regs 0 B
  exit 0
fi
if [ "${1:-run10}" = d256 ]; then  # after the int32 fix (562799f); ptxas sm_90a spill stores in brackets
  d256 tileattn,sdpa_flash 32,64,8,2 64,64,8,2 table      # dK/dV 0 B, dQ 612 B
  d256 tileattn 32,64,8,2 64,32,8,2 dq64x32               # dQ 84 B
  d256 tileattn 64,64,8,2 64,32,8,2 dkdv64x64_dq64x32     # dK/dV 280 B
  d256 tileattn 32,64,8,3 64,32,8,3 stages3
  exit 0
fi
if [ "${1:-run10}" = run12 ]; then
  c128 tileattn,sdpa_flash 32,128,8,3 128,64,8,3 table
  c128 tileattn 32,128,8,2 128,64,8,3 dkdv32x128s2
  c128 tileattn 32,128,8,4 128,64,8,3 dkdv32x128s4
  c128 tileattn 16,128,8,3 128,64,8,3 dkdv16x128
  c128 tileattn 32,128,8,3 128,64,8,2 dq128x64s2
  c128 tileattn 32,128,8,3 128,64,8,4 dq128x64s4
  d64 tileattn,sdpa_flash 32,64,4,3 128,64,8,3 table
  d64 tileattn 64,64,4,3 128,64,8,3 dkdv64x64w4
  d64 tileattn 64,64,8,3 128,64,8,3 dkdv64x64w8
  d64 tileattn 32,128,8,3 128,64,8,3 dkdv32x128
  d64 tileattn 64,128,8,3 128,64,8,3 dkdv64x128
  d64 tileattn 32,64,4,4 128,64,8,3 dkdv32x64s4
  d64 tileattn 32,64,4,3 128,128,8,2 dq128x128
  d64 tileattn 32,64,4,3 128,64,8,4 dq128x64s4
  exit 0
fi
if [ "${1:-run10}" = next ]; then
  run 128 tileattn,sdpa_flash 64,128,8,3 128,64,8,3 d128_table
  run 128 tileattn 64,64,8,3 128,64,8,3 d128_dkdv64x64
  run 128 tileattn 32,128,8,3 128,64,8,3 d128_dkdv32x128
  run 128 tileattn 64,64,8,3 64,64,8,3 d128_dkdv64x64_dq64x64
  exit 0
fi
run 128 tileattn,sdpa_flash 64,128,8,3 128,64,8,3 d128_128x64s3
run 128 tileattn 64,128,8,3 128,64,8,2 d128_128x64s2
run 128 tileattn 64,128,8,3 64,64,4,3 d128_64x64w4
run 256 tileattn,sdpa_flash 64,64,8,2 64,16,8,2 d256_64x16
run 256 tileattn 64,64,8,2 64,32,8,2 d256_64x32
run 256 tileattn 32,64,8,2 64,64,8,2 d256_dkdv32x64_64x64
