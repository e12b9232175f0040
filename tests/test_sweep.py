"""Randomized sweep: random (batch, seqlens, heads, GQA ratio, head dim, causal, dtype, scale, layout).

Each config runs forward + backward against the float64 reference with the same
rule as the other tests (tests/_helpers.py). 500+ configs on GPU, 15 on CPU.

The seed is fixed (DEFAULT_SEED) and printed; override it with
``TILEATTN_SWEEP_SEED=<int>`` (and the count with ``TILEATTN_SWEEP_COUNT``).
Every config is its own test item whose id spells the config, and the failure
message repeats seed and index, so a failing case can be rerun alone with -k.
"""

import math
import os
import random

import pytest
import torch

from _helpers import LARGE, check_attention, dtype_id, make_tensor, make_gen, seed_for

DEFAULT_SEED = 20240917
SEED = int(os.environ.get("TILEATTN_SWEEP_SEED", DEFAULT_SEED))
COUNT = int(os.environ.get("TILEATTN_SWEEP_COUNT", 520 if LARGE else 15))

LAYOUTS = ["contiguous", "bhsd", "sliced", "strided_seq"]
# GPU: every distinct head dim compiles new kernels, so head dims come from a pool: the
# interesting sizes plus a few random ones (drawn from the same seed) across 8..256.
GPU_HEAD_DIM_POOL = [8, 16, 24, 32, 40, 59, 64, 72, 80, 96, 111, 128, 160, 192, 224, 256]


def _seqlen(rng, max_len):
    r = rng.random()
    if r < 0.08:
        return 1
    if r < 0.16:
        return rng.choice([16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192][: 1 + int(math.log2(max_len)) - 4])
    return max(1, int(round(math.exp(rng.uniform(0, math.log(max_len))))))


def _configs(seed, count):
    rng = random.Random(seed)
    pool = GPU_HEAD_DIM_POOL + rng.sample(range(8, 257), 6)
    configs = []
    while len(configs) < count:
        if LARGE:
            B = rng.choice([1, 1, 2, 3, 4])
            Hkv = rng.choice([1, 2, 4, 8])
            ratio = rng.choice([1, 1, 2, 3, 4, 8])
            Sq, Sk = _seqlen(rng, 8192), _seqlen(rng, 8192)
            D = rng.choice(pool)
        else:
            B = rng.choice([1, 2])
            Hkv = rng.choice([1, 2])
            ratio = rng.choice([1, 2, 4])
            Sq, Sk = _seqlen(rng, 130), _seqlen(rng, 130)
            D = rng.randint(8, 256) if rng.random() < 0.5 else rng.randint(8, 72)
        Hq = Hkv * ratio
        # keep the float64 reference's (B, Hq, Sq, Sk) score matrices bounded (~1 GiB on GPU)
        if LARGE and B * Hq * Sq * Sk > 2**27:
            continue
        causal = rng.random() < 0.5
        dtype = rng.choices([torch.float16, torch.bfloat16, torch.float32], weights=[4, 4, 2])[0]
        softmax_scale = None if rng.random() < 0.75 else round(rng.uniform(0.02, 1.5), 4)
        layout = "contiguous" if rng.random() < 0.7 else rng.choice(LAYOUTS[1:])
        configs.append(dict(B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, D=D, causal=causal, dtype=dtype,
                            softmax_scale=softmax_scale, layout=layout))
    return configs


CONFIGS = _configs(SEED, COUNT)


def _id(i_cfg):
    i, c = i_cfg
    return (f"{i:03d}-b{c['B']}-q{c['Sq']}-k{c['Sk']}-h{c['Hq']}x{c['Hkv']}-d{c['D']}-{dtype_id(c['dtype'])}"
            f"-{'causal' if c['causal'] else 'full'}-s{c['softmax_scale']}-{c['layout']}")


@pytest.mark.parametrize("index_config", list(enumerate(CONFIGS)), ids=_id)
def test_random_config(index_config):
    index, c = index_config
    print(f"TILEATTN_SWEEP_SEED={SEED} config #{index}: {c}")
    gen = make_gen(seed_for("sweep", SEED, index))
    B, Sq, Sk, Hq, Hkv, D, dtype = c["B"], c["Sq"], c["Sk"], c["Hq"], c["Hkv"], c["D"], c["dtype"]
    q = make_tensor((B, Sq, Hq, D), dtype, gen, layout=c["layout"], requires_grad=True)
    k = make_tensor((B, Sk, Hkv, D), dtype, gen, layout=c["layout"], requires_grad=True)
    v = make_tensor((B, Sk, Hkv, D), dtype, gen, layout=c["layout"], requires_grad=True)
    dout = make_tensor((B, Sq, Hq, D), dtype, gen, layout=c["layout"])
    check_attention(q, k, v, causal=c["causal"], softmax_scale=c["softmax_scale"], dout=dout,
                    extra=f"sweep seed={SEED} #{index} layout={c['layout']}")
