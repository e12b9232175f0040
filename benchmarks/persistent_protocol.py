"""A host model of the persistent Gluon dQ kernel's synchronisation (kernels/gluon_dq.py, v35b: at most one
program per SM taking the query tiles in a static round robin). Producer warp and consumer warpgroups run as
coroutines over mbarriers with PTX's phase-parity semantics (``flat_protocol.Barrier``). TMA copies land in a
random order at random times after they are issued. For any list of items (key tiles per query tile) it checks that

* every program finishes (no deadlock), and every item is computed once by each consumer warpgroup;
* every product reads the buffers of its own item and ring position: Q / dO halves, K / V ring slots;
* the producer never refills a buffer or ring slot that a consumer still reads (between its issue and its
  release).

It mirrors the kernel's barrier operations (``_dq_load`` / ``_dq_load_persistent`` and ``_dq_consumer`` /
``_dq_consumer_persistent``); ``check_fwd`` mirrors the persistent forward's (``gluon_forward._consumer`` with its
warpgroups' turns and v38a's skipped tiles; its producer loads the Q parts once every part is free, as
``gluon_loads._load_persistent``; session 31 removed v38b, which loaded each part once that part was free: the
model passed with either). A change to one must be made to the other. (Session 27 also modelled a work-queue
form of the dQ kernel, v35d, and a persistent dK/dV kernel, v35e; both were measured no faster and removed, with
their models: commit 10f8151 has them.) Usage: ``python benchmarks/persistent_protocol.py [--cases 300]``, or ``check_dq(items, nprog,
...)`` / ``check_fwd(items, nprog, ...)``.
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flat_protocol import Barrier, Deadlock  # noqa: E402


class _Machine:
    """Barriers, in-flight TMA copies and the scheduler of one model run."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.bars = {}
        self.in_flight = []  # (barrier key, buffer list, index, value)

    def bar(self, key, count=1):
        if key not in self.bars:
            self.bars[key] = Barrier(key, count)
        return self.bars[key]

    def wait(self, key, parity):
        while not self.bars[key].passes(parity):
            yield

    def copy(self, key, buf, i, value):
        self.in_flight.append((key, buf, i, value))

    def run(self, agents, what):
        def tma():
            while len(agents) > 1 or self.in_flight:
                if self.in_flight and self.rng.random() < 0.3:
                    key, buf, i, value = self.in_flight.pop(self.rng.randrange(len(self.in_flight)))
                    buf[i] = value
                    self.bars[key].arrive()
                yield
        agents["tma"] = tma()
        idle = 0
        while agents:
            state = tuple(b.completed * 64 + b.pending for b in self.bars.values()) + (len(agents),
                                                                                       len(self.in_flight))
            for name in list(agents):
                try:
                    next(agents[name])
                except StopIteration:
                    del agents[name]
            new = tuple(b.completed * 64 + b.pending for b in self.bars.values()) + (len(agents),
                                                                                     len(self.in_flight))
            idle = idle + 1 if new == state else 0
            if agents and idle > 300:
                raise Deadlock(f"stuck: {sorted(agents)} with {what}")


def _load_ring(mach, key, pid, k, v, n, t0):
    """The producer's K / V ring loads (``gluon_common.load_kv_ring``): tiles t0 .. t0 + n - 1, each slot refilled
    once its empty barrier passed, asserting no consumer still reads it. k / v: (slots, users per slot)."""
    for j in range(n):
        t = t0 + j
        for (slots, users), name in ((k, "k"), (v, "v")):
            stages = len(slots)
            i = t % stages
            yield from mach.wait(key(f"{name}_empty", i), ((t // stages) & 1) ^ 1)
            assert not users[i], f"program {pid}: {name.upper()} slot {i} refilled while in use"
            mach.copy(key(f"{name}_ready", i), slots, i, t)
            yield


def check_dq(items, nprog, k_stages=3, v_stages=2, seed=0):
    """The persistent dQ kernel: ``items[i]`` = key tiles of query tile i (0 allowed: rows that see no key),
    ``nprog`` programs, items pid, pid + nprog, ... each. Returns {item: program} of who computed it."""
    mach = _Machine(seed)
    done = {}  # (item, warpgroup) -> program

    def program(pid):
        bar = lambda name, i=0, count=1: mach.bar((pid, name, i), count)  # noqa: E731
        for i in range(2):
            bar("q_bars", i), bar("q_empty", i)
        for i in range(k_stages):
            bar("k_ready", i), bar("k_empty", i, 2)
        for i in range(v_stages):
            bar("v_ready", i), bar("v_empty", i, 2)
        key = lambda name, i=0: (pid, name, i)  # noqa: E731
        q_buf, k_slot, v_slot = [None] * 2, [None] * k_stages, [None] * v_stages
        q_users, k_users, v_users = [set(), set()], [set() for _ in range(k_stages)], [set() for _ in range(v_stages)]

        def load_item(item, it, t0):  # _dq_load: Q / dO halves (after q_empty), then the K / V ring
            for w in range(2):
                yield from mach.wait(key("q_empty", w), (it & 1) ^ 1)
                assert not q_users[w], f"program {pid}: Q half {w} refilled while in use"
                mach.copy(key("q_bars", w), q_buf, w, item)
                yield

        def load_ring(n, t0):  # load_kv_ring
            yield from _load_ring(mach, key, pid, (k_slot, k_users), (v_slot, v_users), n, t0)

        def producer():  # _dq_load_persistent
            t0, it = 0, 0
            for item in range(pid, len(items), nprog):
                yield from load_item(item, it, t0)
                yield from load_ring(items[item], t0)
                t0, it = t0 + items[item], it + 1

        def consume(w, item, it, t0):  # _dq_consumer with t0 / q_phase / q_empty / dq_stage
            n = items[item]
            yield from mach.wait(key("q_bars", w), it & 1)
            assert q_buf[w] == item, f"program {pid} wg{w}: item {item} found Q half holding {q_buf[w]}"
            q_users[w].add(w)
            if n > 0:
                ks0, vs0 = t0 % k_stages, t0 % v_stages
                yield from mach.wait(key("k_ready", ks0), (t0 // k_stages) & 1)
                assert k_slot[ks0] == t0
                k_users[ks0].add(w)
                yield from mach.wait(key("v_ready", vs0), (t0 // v_stages) & 1)
                assert v_slot[vs0] == t0
                v_users[vs0].add(w)
                yield
                v_users[vs0].discard(w)
                mach.bars[key("v_empty", vs0)].arrive()
                for j in range(1, n):
                    t = t0 + j
                    ks, vs, kp = t % k_stages, t % v_stages, (t - 1) % k_stages
                    yield from mach.wait(key("k_ready", ks), (t // k_stages) & 1)
                    assert k_slot[ks] == t and k_slot[kp] == t - 1, f"program {pid} wg{w}: K ring at {t}"
                    k_users[ks].add(w)
                    yield from mach.wait(key("v_ready", vs), (t // v_stages) & 1)
                    assert v_slot[vs] == t
                    v_users[vs].add(w)
                    yield
                    k_users[kp].discard(w)
                    mach.bars[key("k_empty", kp)].arrive()
                    v_users[vs].discard(w)
                    mach.bars[key("v_empty", vs)].arrive()
                q_users[w].discard(w)
                mach.bars[key("q_empty", w)].arrive()
                kp = (t0 + n - 1) % k_stages
                assert k_slot[kp] == t0 + n - 1
                yield
                k_users[kp].discard(w)
                mach.bars[key("k_empty", kp)].arrive()
            else:
                q_users[w].discard(w)
                mach.bars[key("q_empty", w)].arrive()
            assert (item, w) not in done, f"item {item} computed twice by wg{w}"
            done[(item, w)] = pid
            yield

        def consumer(w):  # _dq_consumer_persistent
            t0, it = 0, 0
            for item in range(pid, len(items), nprog):
                yield from consume(w, item, it, t0)
                t0, it = t0 + items[item], it + 1

        return {f"p{pid}": producer(), f"c{pid}.0": consumer(0), f"c{pid}.1": consumer(1)}

    agents = {}
    for pid in range(nprog):
        agents.update(program(pid))
    mach.run(agents, f"dq items {items}, {nprog} programs")
    assert set(done) == {(i, w) for i in range(len(items)) for w in range(2)}, "items missed"
    assert all(done[(i, 0)] == done[(i, 1)] for i in range(len(items))), "an item's halves in two programs"
    return {i: done[(i, 0)] for i in range(len(items))}


def check_fwd(items, nprog, nwg=3, k_stages=3, v_stages=2, seen=None, seed=0, bug=None, order=None):
    """The persistent Gluon forward (kernels/gluon_forward.py ``_consumer`` / ``_load_persistent``, D <= 128: Q
    released after an item's last Q K^T, outputs in their own buffers) with ``nwg`` consumer warpgroups taking
    turns (``turn_wait``: one round per key tile plus one per item). ``items[i]`` = key tiles of item i;
    ``seen[i][w]`` (default: all) = how many of them warpgroup w computes, the rest drained as v38a's CAUSAL_SKIP
    does (wait for the tile to land, release K and V, pass the turn). ``bug``: "no_ready_wait" drains without
    waiting for the tiles to land (caught where every warpgroup drains a tile: nothing then keeps the releases
    behind the producer; safe where one warpgroup computes every tile, as in causal items, whose last
    warpgroup sees all their keys: the turns then order each release after the slot's previous use's), "free_run"
    also without the turns (caught). ``order``: per program, the items it runs in turn (default: round robin,
    pid, pid + nprog, ...; stream-K's segments: ``streamk_items``). Returns {item: program}."""
    mach = _Machine(seed)
    done = {}

    def program(pid):
        bar = lambda name, i=0, count=1: mach.bar((pid, name, i), count)  # noqa: E731
        for i in range(nwg):
            bar("q_bars", i), bar("q_empty", i), bar("turn", i)
        for i in range(k_stages):
            bar("k_ready", i), bar("k_empty", i, nwg)
        for i in range(v_stages):
            bar("v_ready", i), bar("v_empty", i, nwg)
        key = lambda name, i=0: (pid, name, i)  # noqa: E731
        arrive = lambda name, i=0: mach.bars[key(name, i)].arrive()  # noqa: E731
        q_buf, k_slot, v_slot = [None] * nwg, [None] * k_stages, [None] * v_stages
        q_users = [set() for _ in range(nwg)]
        k_users, v_users = [set() for _ in range(k_stages)], [set() for _ in range(v_stages)]

        def producer():  # _load_persistent: Q parts (after q_empty), then the K / V ring
            t0, it = 0, 0
            for item in (order[pid] if order is not None else range(pid, len(items), nprog)):
                for w in range(nwg):  # every part released first, then the loads (as the kernel's D <= 128 form)
                    yield from mach.wait(key("q_empty", w), (it & 1) ^ 1)
                for w in range(nwg):
                    assert not q_users[w], f"program {pid}: Q part {w} refilled while in use"
                    mach.copy(key("q_bars", w), q_buf, w, item)
                    yield
                yield from _load_ring(mach, key, pid, (k_slot, k_users), (v_slot, v_users), items[item], t0)
                t0, it = t0 + items[item], it + 1

        def turn_wait(w, r):
            yield from mach.wait(key("turn", w), (r & 1) ^ 1 if w == 0 else r & 1)

        def use_k(w, t):
            ks = t % k_stages
            yield from mach.wait(key("k_ready", ks), (t // k_stages) & 1)
            assert k_slot[ks] == t, f"program {pid} wg{w}: K slot {ks} holds {k_slot[ks]}, not {t}"
            k_users[ks].add(w)

        def use_v(w, t):
            vs = t % v_stages
            yield from mach.wait(key("v_ready", vs), (t // v_stages) & 1)
            assert v_slot[vs] == t, f"program {pid} wg{w}: V slot {vs} holds {v_slot[vs]}, not {t}"
            v_users[vs].add(w)

        def free_k(w, t):
            k_users[t % k_stages].discard(w)
            arrive("k_empty", t % k_stages)

        def free_v(w, t):
            v_users[t % v_stages].discard(w)
            arrive("v_empty", t % v_stages)

        def consume(w, item, it, t0, r0):  # _consumer (PERSISTENT, not Q_STAGE)
            n = items[item]
            n_w = n if seen is None else seen[item][w]
            nxt = (w + 1) % nwg
            yield from mach.wait(key("q_bars", w), it & 1)
            assert q_buf[w] == item, f"program {pid} wg{w}: item {item} found Q part holding {q_buf[w]}"
            q_users[w].add(w)
            if n_w > 0:
                yield from turn_wait(w, r0)
                yield from use_k(w, t0)  # S_0 issued
                arrive("turn", nxt)
                yield
                free_k(w, t0)  # S_0 waited
                for j in range(1, n_w):
                    yield from turn_wait(w, r0 + j)
                    yield from use_k(w, t0 + j)  # S_j issued
                    yield from use_v(w, t0 + j - 1)  # P V_{j-1} issued (pv_issue)
                    arrive("turn", nxt)
                    yield
                    free_k(w, t0 + j)  # S_j waited
                    yield
                    free_v(w, t0 + j - 1)  # P V_{j-1} waited
                q_users[w].discard(w)
                arrive("q_empty", w)
                yield from turn_wait(w, r0 + n_w)
                yield from use_v(w, t0 + n_w - 1)
                arrive("turn", nxt)
                yield
                free_v(w, t0 + n_w - 1)
            else:  # no key tile: one empty round
                q_users[w].discard(w)
                arrive("q_empty", w)
                yield from turn_wait(w, r0)
                arrive("turn", nxt)
            for j in range(max(n_w, 0), n):  # CAUSAL_SKIP's drained tiles
                t = t0 + j
                if bug != "free_run":
                    yield from turn_wait(w, r0 + j + 1)
                if bug not in ("no_ready_wait", "free_run"):
                    yield from mach.wait(key("k_ready", t % k_stages), (t // k_stages) & 1)
                arrive("k_empty", t % k_stages)
                if bug not in ("no_ready_wait", "free_run"):
                    yield from mach.wait(key("v_ready", t % v_stages), (t // v_stages) & 1)
                arrive("v_empty", t % v_stages)
                arrive("turn", nxt)
                yield
            assert (item, w) not in done, f"item {item} computed twice by wg{w}"
            done[(item, w)] = pid
            yield

        def consumer(w):  # _consumer_persistent: item it's rounds start at t0 + it
            t0, it = 0, 0
            for item in (order[pid] if order is not None else range(pid, len(items), nprog)):
                yield from consume(w, item, it, t0, t0 + it)
                t0, it = t0 + items[item], it + 1

        return {f"p{pid}": producer(), **{f"c{pid}.{w}": consumer(w) for w in range(nwg)}}

    agents = {}
    for pid in range(nprog):
        agents.update(program(pid))
    mach.run(agents, f"fwd items {items}, {nprog} programs, {nwg} warpgroups, seen {seen}")
    assert set(done) == {(i, w) for i in range(len(items)) for w in range(nwg)}, "items missed"
    return {i: done[(i, 0)] for i in range(len(items))}


def streamk_items(num_items, n, nprog):
    """Stream-K's schedule (``gluon_streamk.segments``, the kernel's mirror) as ``check_fwd``'s items and order:
    each program's segments (key tiles of one item) as items of their own lengths, in its order."""
    from tileattn.kernels.gluon_streamk import segments
    items, order = [], []
    for mine in segments(num_items, n, nprog):
        order.append(list(range(len(items), len(items) + len(mine))))
        items += [count for _, _, count, _ in mine]
    return items, order


def random_streamk_cases(cases, seed=40):
    """``cases`` random runs of the forward model on stream-K schedules (two or three warpgroups)."""
    rng = random.Random(seed)
    for _ in range(cases):
        n, nprog = rng.randint(1, 6), rng.randint(1, 4)
        items, order = streamk_items(rng.randint(nprog, 3 * nprog + 2), n, nprog)
        check_fwd(items, nprog, rng.choice((2, 3)), rng.choice((2, 3)), 2, None, rng.randrange(1 << 30), None, order)


def random_fwd_cases(cases, seed=38, skip=True):
    """``cases`` random runs of the forward model with three warpgroups (``skip``: each warpgroup computing a
    random prefix of its items' tiles, as CAUSAL_SKIP); raises on the first failure."""
    rng = random.Random(seed)
    for _ in range(cases):
        items = [rng.randint(0, 6) for _ in range(rng.randint(1, 10))]
        seen = [[rng.randint(0, n) for _ in range(3)] for n in items] if skip else None
        check_fwd(items, rng.randint(1, min(3, len(items))), 3, rng.choice((2, 3)), 2, seen, rng.randrange(1 << 30))


def random_cases(cases, seed=27):
    """``cases`` random runs of the model; raises on the first failure."""
    rng = random.Random(seed)
    for _ in range(cases):
        items = [rng.randint(0, 7) for _ in range(rng.randint(1, 12))]
        nprog = rng.randint(1, min(4, len(items)))
        check_dq(items, nprog, rng.choice((2, 3)), rng.choice((2, 3)), rng.randrange(1 << 30))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=300)
    args = ap.parse_args()
    random_cases(args.cases)
    random_fwd_cases(args.cases)
    print(f"{args.cases} random cases each (dQ; forward with three warpgroups skipping tiles): no deadlock, every "
          "read of its own buffers, no refill in use")
