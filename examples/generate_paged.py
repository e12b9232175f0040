"""Greedy generation from a small randomly initialised decoder with a paged KV cache.

Prefill and decode both run ``tileattn.flash_attn_with_kvcache`` with ``block_table`` and ``causal=True``: the
prefill passes the whole prompt as q and its K/V as k/v at ``cache_seqlens`` 0, appending them into the empty
pages; each decode step appends the new token's K/V in place. The script checks that decoding with the cache gives
the same logits as re-running the whole sequence without a cache (``tileattn.flash_attn_func``, causal).

Usage: python examples/generate_paged.py   (GPU; without one it runs tiny in Triton's interpreter)
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import tileattn  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
VOCAB, DIM, HEADS, KV_HEADS, LAYERS = (1024, 512, 8, 2, 4) if DEV == "cuda" else (97, 64, 4, 2, 2)
HEAD_DIM = DIM // HEADS
PAGE = 16


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(DIM), torch.nn.LayerNorm(DIM)
        self.q = torch.nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.kv = torch.nn.Linear(DIM, 2 * KV_HEADS * HEAD_DIM, bias=False)
        self.o = torch.nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(DIM, 4 * DIM), torch.nn.GELU(), torch.nn.Linear(4 * DIM, DIM))

    def forward(self, x, cache=None, block_table=None, lens=None):
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, HEADS, HEAD_DIM)
        k, v = self.kv(h).view(b, s, 2, KV_HEADS, HEAD_DIM).unbind(2)
        if cache is None:  # no cache: plain causal attention over the whole sequence
            a = tileattn.flash_attn_func(q, k, v, causal=True)
        else:
            k_cache, v_cache = cache
            a = tileattn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lens,
                                                 block_table=block_table, causal=True)
        x = x + self.o(a.reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens, caches=None, block_table=None, lens=None):
        x = self.emb(tokens)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i], block_table, lens)
        return self.head(x)


@torch.no_grad()
def main():
    torch.manual_seed(0)
    model = TinyLM().to(DEV, DTYPE).eval()
    batch, prompt_len, new_tokens = (4, 100, 32) if DEV == "cuda" else (2, 11, 6)
    max_pages = (prompt_len + new_tokens + PAGE - 1) // PAGE
    num_blocks = batch * max_pages + 5
    # shuffled page assignment: sequence b's logical page p lives in physical block block_table[b, p]
    block_table = torch.randperm(num_blocks, device=DEV)[:batch * max_pages].view(batch, max_pages).to(torch.int32)
    caches = [(torch.zeros(num_blocks, PAGE, KV_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE),
               torch.zeros(num_blocks, PAGE, KV_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)) for _ in range(LAYERS)]
    tokens = torch.randint(0, VOCAB, (batch, prompt_len), device=DEV)
    lens = torch.zeros(batch, dtype=torch.int32, device=DEV)
    # prefill through the cache path (Sq = prompt_len, causal, appended in place)
    logits = model(tokens, caches, block_table, lens)
    lens += prompt_len
    out = [logits[:, -1].argmax(-1)]
    for _ in range(new_tokens - 1):
        logits = model(out[-1][:, None], caches, block_table, lens)
        lens += 1
        out.append(logits[:, -1].argmax(-1))
    generated = torch.stack(out, 1)
    # check: the last step's logits equal a full no-cache forward over prompt + generated tokens
    full = torch.cat([tokens, generated[:, :-1]], 1)
    ref = model(full)[:, -1].float()
    err = (logits[:, -1].float() - ref).abs().max().item() / ref.abs().max().item()
    print(f"device {DEV}, {batch} sequences, prompt {prompt_len}, generated {new_tokens} tokens with a paged cache "
          f"(page {PAGE}); first sequence: {generated[0].tolist()[:12]}...")
    tol = 5e-2 if DTYPE == torch.bfloat16 else 1e-4
    print(f"cache vs no-cache logits: relative error {err:.2e} ({'ok' if err < tol else 'MISMATCH'})")
    return 0 if err < tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
