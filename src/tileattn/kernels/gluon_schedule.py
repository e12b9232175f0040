"""Block bounds of the Hopper Gluon kernels (sm90 only): the program -> (batch, head, query tile) map of a grid, a
persistent grid's item order (LPT for causal calls), a varlen sequence's packed rows, the key-tile range a query
tile sees (causal / window), and the forward's work item -> all of these at once (``item_bounds``; on the
host's work list with USE_MAP). Used by ``gluon_forward`` / ``gluon_loads`` / ``gluon_flat`` (items),
``gluon_dq`` (tiles, key ranges) and ``gluon_backward`` (sequence bounds)."""

from .gluon_common import AVAILABLE

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def program_tile(pid, num_m_tiles, q_heads, LONGEST_FIRST: gl.constexpr):
        """(b, h, tile) of program pid in a grid of num_m_tiles query tiles per (batch, head), heads inner; with
        LONGEST_FIRST (causal / window) the tiles of each (batch, head) run last to first."""
        bh = pid // num_m_tiles
        tile = pid % num_m_tiles
        if LONGEST_FIRST:
            tile = num_m_tiles - 1 - tile  # longest tiles first
        return bh // q_heads, bh % q_heads, tile

    @gluon.jit
    def persistent_item(pos, pid, nprog, num_items, num_m_tiles, LPT: gl.constexpr):
        """The grid index (``program_tile``'s pid) of the pos-th item of a persistent grid of nprog programs, program
        pid running positions pid, pid + nprog, ... < num_items. Without LPT the identity. LPT (causal): every
        (batch, head)'s longest tile first, then every one's second longest, ..., and each full round of nprog
        positions taken in reverse by the programs on odd rounds (program 0 gets the round's longest item on even
        rounds and its shortest on odd ones), so a static round-robin sees items of nearly equal length per round
        and no program collects the long ones; the grid's own order ((batch, head) outer) gave programs up to 3x
        each other's work at 16k (NOTES v19b). A bijection on [0, num_items): the last, partial round keeps its
        order. ``benchmarks/persistent_balance.py`` mirrors it on the host."""
        if LPT:
            r = pos // nprog
            if (r % 2 == 1) & ((r + 1) * nprog <= num_items):
                pos = r * nprog + nprog - 1 - pid
            nbh = num_items // num_m_tiles
            pos = (pos % nbh) * num_m_tiles + pos // nbh
        return pos

    @gluon.jit
    def seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: gl.constexpr):
        """(q_row0, seqlen_q, k_row0, seqlen_k, b_desc) of program batch index b: varlen sequence b spans packed
        rows CU_Q[b] .. CU_Q[b + 1] (keys: CU_K) of the descriptors' batch 0; batched, rows count from 0 in batch
        b and the lengths are the arguments."""
        if VARLEN:
            q_row0 = gl.load(CU_Q + b)
            seqlen_q = gl.load(CU_Q + b + 1) - q_row0
            k_row0 = gl.load(CU_K + b)
            seqlen_k = gl.load(CU_K + b + 1) - k_row0
            b_desc = 0
        else:
            q_row0 = 0
            k_row0 = 0
            b_desc = b
        return q_row0, seqlen_q, k_row0, seqlen_k, b_desc

    @gluon.jit
    def key_tiles(start_m, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  CAUSAL: gl.constexpr, WINDOW: gl.constexpr, VARLEN: gl.constexpr):
        """(lo, n): the key tiles lo .. lo + n - 1 that query rows [start_m, start_m + BLOCK_M) see (causal:
        up to the bottom-right diagonal; window: row r sees keys [r + diag - win_left, r + diag + win_right]);
        n = 0 for a varlen tile past its sequence's end."""
        lo = 0
        hi = seqlen_k
        if CAUSAL:
            hi = gl.minimum(seqlen_k, gl.maximum(start_m + BLOCK_M + seqlen_k - seqlen_q, 0))
        if WINDOW:
            lo = gl.maximum(start_m + seqlen_k - seqlen_q - win_left, 0) // BLOCK_N
            hi = gl.minimum(seqlen_k, gl.maximum(start_m + BLOCK_M + seqlen_k - seqlen_q + win_right, 0))
        n = gl.cdiv(hi, BLOCK_N)
        if WINDOW:
            n = gl.maximum(n - lo, 0)
        if VARLEN:  # a tile past its sequence's end (the grid covers the longest): no work, nothing stored
            n = gl.where(start_m < seqlen_q, n, 0)
        return lo, n

    @gluon.jit
    def item_bounds(item, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, seqlen_q, seqlen_k, win_left, win_right,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                     VARLEN: gl.constexpr, USE_MAP: gl.constexpr):
        """The Gluon forward's work item -> (b, h, start_m, q_row0, seqlen_q, k_row0, seqlen_k, b_desc, lo, n): the
        query tile's batch / sequence b, head h and first row, its sequence's bounds (``seq_bounds``) and key
        tiles lo .. lo + n - 1.
        USE_MAP: item is a work-list index, entry TILE_MAP[item] = (tile * num_m_tiles + b) * q_heads + h
        (num_m_tiles is then the batch); else the grid's order (``program_tile``)."""
        if USE_MAP:
            entry = gl.load(TILE_MAP + item)
            h = entry % q_heads
            b = (entry // q_heads) % num_m_tiles
            tile = entry // q_heads // num_m_tiles
        else:
            b, h, tile = program_tile(item, num_m_tiles, q_heads, CAUSAL or WINDOW)
        start_m = tile * BLOCK_M
        q_row0, seqlen_q, k_row0, seqlen_k, b_desc = seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
        # key tiles [lo, lo + n) for the whole tile (both warpgroups run the same count: the ping-pong pairs them)
        lo, n = key_tiles(start_m, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, VARLEN)
        return b, h, start_m, q_row0, seqlen_q, k_row0, seqlen_k, b_desc, lo, n

    @gluon.jit
    def persistent_bounds(pos, pid, nprog, num_items, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, seqlen_q,
                          seqlen_k, win_left, win_right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          CAUSAL: gl.constexpr, WINDOW: gl.constexpr, VARLEN: gl.constexpr, USE_MAP: gl.constexpr):
        """``item_bounds`` of a persistent program's pos-th position (``persistent_item``'s order: the kernel's LPT
        for causal calls without a work list): one decoding for the producer and the consumers, which must agree."""
        g = persistent_item(pos, pid, nprog, num_items, num_m_tiles, CAUSAL and not USE_MAP)
        return item_bounds(g, TILE_MAP, CU_Q, CU_K, num_m_tiles, q_heads, seqlen_q, seqlen_k, win_left, win_right,
                           BLOCK_M, BLOCK_N, CAUSAL, WINDOW, VARLEN, USE_MAP)

    @gluon.jit
    def persistent_range(pid, nprog, num_items, seqlen_k, BLOCK_N: gl.constexpr, STREAMK: gl.constexpr):
        """(start, stop, step, t_begin, t_end) of a persistent program's items: pid, pid + nprog, ... < num_items;
        STREAMK (batched, non-causal, no window: every item has the same n = cdiv(seqlen_k, BLOCK_N) key tiles):
        the items holding tiles [t_begin, t_end) = [floor(pid W / nprog), floor((pid + 1) W / nprog)) of the
        item-major sequence of W = num_items * n tiles, consecutive (``streamk_segment`` cuts the first and last)."""
        if STREAMK:
            n = gl.cdiv(seqlen_k, BLOCK_N)
            work = gl.to_tensor(num_items).to(gl.int64) * n  # int64 products: pid * work passes 2^31 on large calls
            t_begin = (pid * work // nprog).to(gl.int32)
            t_end = ((pid + 1) * work // nprog).to(gl.int32)
            start = t_begin // n
            stop = gl.cdiv(t_end, n)
            step = 1
        else:
            t_begin = 0
            t_end = 0
            start = pid
            stop = num_items
            step = nprog
        return start, stop, step, t_begin, t_end

    @gluon.jit
    def streamk_segment(item, start, lo, n, t_begin, t_end):
        """STREAMK: the part of item ``item`` (key tiles lo .. lo + n - 1) within tiles [t_begin, t_end): (lo, n,
        slot), slot -1 for the whole item, else the partial result's slot (0: the program's first item, 1: its
        last; a program has at most these two partial items)."""
        seg_lo = gl.maximum(t_begin - item * n, 0)
        seg_hi = gl.minimum(t_end - item * n, n)
        whole = (seg_lo == 0) & (seg_hi == n)
        slot = gl.where(whole, -1, gl.where(item == start, 0, 1))
        return lo + seg_lo, seg_hi - seg_lo, slot
