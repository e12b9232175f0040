"""A host model of the persistent backward kernels' synchronisation: the Gluon dQ kernel on its persistent grid
(kernels/gluon_dq.py, v35b's static round robin and v35d's work queue) and the dK/dV kernel on its persistent grid
(kernels/gluon_backward.py with gluon_backward_persistent.py, v35e). Producer warp and consumer warpgroups run as
coroutines over mbarriers with PTX's phase-parity semantics (``flat_protocol.Barrier``). TMA copies land in a
random order at random times after they are issued. Several programs (CTAs) share the dQ kernel's work queue.
For any list of items (key tiles per query tile for dQ, query steps per key tile for dK/dV) it checks that

* every program finishes (no deadlock), and every item is computed once by each consumer warpgroup;
* every product reads the buffers of its own item and ring position: Q / dO halves and the item index handed
  over in the queue's shared-memory slot (dQ), K / V (dK/dV), and the ring slots;
* the producer never refills a buffer or ring slot that a consumer still reads (between its issue and its
  release).

It mirrors the kernels' barrier operations (``_dq_load`` / ``_dq_load_persistent`` / ``_dq_load_queue`` and
``_dq_consumer`` / ``_dq_consumer_persistent`` / ``_dq_consumer_queue``; ``_dkdv_load`` / ``_dkdv_consumer``'s
pipelined branch and their persistent loops). A change to one must be made to the other. Usage:
``python benchmarks/persistent_protocol.py [--cases 300]``, or ``check_dq(items, nprog, ...)`` /
``check_dkdv(items, nprog, ...)``.
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


def check_dq(items, nprog, k_stages=3, v_stages=2, queue=False, seed=0):
    """The persistent dQ kernel: ``items[i]`` = key tiles of query tile i (0 allowed: rows that see no key),
    ``nprog`` programs, items pid, pid + nprog, ... each (static) or drawn from one queue shared by the programs
    (``queue``). Returns {item: program} of who computed it."""
    mach = _Machine(seed)
    done = {}  # (item, warpgroup) -> program
    counter = [0, 0]  # the queue: next item, programs done drawing

    def program(pid):
        bar = lambda name, i=0, count=1: mach.bar((pid, name, i), count)  # noqa: E731
        for i in range(2):
            bar("q_bars", i), bar("q_empty", i)
        for i in range(k_stages):
            bar("k_ready", i), bar("k_empty", i, 2)
        for i in range(v_stages):
            bar("v_ready", i), bar("v_empty", i, 2)
        key = lambda name, i=0: (pid, name, i)  # noqa: E731
        q_buf, slot, k_slot, v_slot = [None] * 2, [None] * 2, [None] * k_stages, [None] * v_stages
        q_users, k_users, v_users = [set(), set()], [set() for _ in range(k_stages)], [set() for _ in range(v_stages)]

        def draw():
            counter[0] += 1
            return counter[0] - 1

        def load_item(item, it, t0):  # _dq_load: Q / dO halves (after q_empty), then the K / V ring
            for w in range(2):
                yield from mach.wait(key("q_empty", w), (it & 1) ^ 1)
                assert not q_users[w], f"program {pid}: Q half {w} refilled while in use"
                slot[w] = item
                mach.copy(key("q_bars", w), q_buf, w, item)
                yield

        def load_ring(n, t0):  # load_kv_ring
            for j in range(n):
                t = t0 + j
                ks, vs = t % k_stages, t % v_stages
                yield from mach.wait(key("k_empty", ks), ((t // k_stages) & 1) ^ 1)
                assert not k_users[ks], f"program {pid}: K slot {ks} refilled while in use"
                mach.copy(key("k_ready", ks), k_slot, ks, t)
                yield
                yield from mach.wait(key("v_empty", vs), ((t // v_stages) & 1) ^ 1)
                assert not v_users[vs], f"program {pid}: V slot {vs} refilled while in use"
                mach.copy(key("v_ready", vs), v_slot, vs, t)
                yield

        def producer():
            t0, it = 0, 0
            if queue:  # _dq_load_queue
                item = draw()
                while item < len(items):
                    yield from load_item(item, it, t0)
                    nxt = draw()
                    yield from load_ring(items[item], t0)
                    t0, it, item = t0 + items[item], it + 1, nxt
                for w in range(2):
                    yield from mach.wait(key("q_empty", w), (it & 1) ^ 1)
                    slot[w] = -1
                    mach.bars[key("q_bars", w)].arrive()
                    yield
                counter[1] += 1
                if counter[1] == nprog:
                    counter[0] = counter[1] = 0
            else:  # _dq_load_persistent
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

        def consumer(w):
            t0, it = 0, 0
            if queue:  # _dq_consumer_queue
                yield from mach.wait(key("q_bars", w), 0)
                item = slot[w]
                while item >= 0:
                    yield from consume(w, item, it, t0)
                    t0, it = t0 + items[item], it + 1
                    yield from mach.wait(key("q_bars", w), it & 1)
                    item = slot[w]
            else:  # _dq_consumer_persistent
                for item in range(pid, len(items), nprog):
                    yield from consume(w, item, it, t0)
                    t0, it = t0 + items[item], it + 1

        return {f"p{pid}": producer(), f"c{pid}.0": consumer(0), f"c{pid}.1": consumer(1)}

    agents = {}
    for pid in range(nprog):
        agents.update(program(pid))
    mach.run(agents, f"dq items {items}, {nprog} programs, queue={queue}")
    assert set(done) == {(i, w) for i in range(len(items)) for w in range(2)}, "items missed"
    assert all(done[(i, 0)] == done[(i, 1)] for i in range(len(items))), "an item's halves in two programs"
    if queue:
        assert counter == [0, 0], f"the queue was left at {counter}"
    return {i: done[(i, 0)] for i in range(len(items))}


def check_dkdv(items, nprog, stages=4, kv_regs=1, seed=0):
    """The persistent dK/dV kernel: ``items[i]`` = query steps (group x query tiles, >= 1) of key tile i, items
    pid, pid + nprog, ... per program; K / V released after their register loads (``kv_regs`` 2) or after the
    item's last products."""
    mach = _Machine(seed)
    done = set()

    def program(pid):
        key = lambda name, i=0: (pid, name, i)  # noqa: E731
        mach.bar(key("kv_bar")), mach.bar(key("kv_empty"), 2)
        for i in range(stages):
            mach.bar(key("ready", i)), mach.bar(key("empty", i), 2)
        kv, ring = [None], [None] * stages
        kv_users, ring_users = set(), [set() for _ in range(stages)]

        def producer():  # _dkdv_load_persistent / _dkdv_load
            t0 = 0
            for it, item in enumerate(range(pid, len(items), nprog)):
                yield from mach.wait(key("kv_empty"), (it & 1) ^ 1)
                assert not kv_users, f"program {pid}: K / V refilled while in use by {kv_users}"
                mach.copy(key("kv_bar"), kv, 0, item)
                yield
                for t in range(items[item]):
                    s = (t0 + t) % stages
                    yield from mach.wait(key("empty", s), (((t0 + t) // stages) & 1) ^ 1)
                    assert not ring_users[s], f"program {pid}: ring slot {s} refilled while in use"
                    mach.copy(key("ready", s), ring, s, t0 + t)
                    yield
                t0 += items[item]

        def consumer(w):  # _dkdv_consumer_persistent / _dkdv_consumer (PIPELINE)
            t0 = 0
            for it, item in enumerate(range(pid, len(items), nprog)):
                n = items[item]
                yield from mach.wait(key("kv_bar"), it & 1)
                assert kv[0] == item, f"program {pid} wg{w}: item {item} found K / V of {kv[0]}"
                kv_users.add(w)
                if kv_regs >= 2:
                    kv_users.discard(w)
                    mach.bars[key("kv_empty")].arrive()
                s0 = t0 % stages
                yield from mach.wait(key("ready", s0), (t0 // stages) & 1)
                assert ring[s0] == t0
                ring_users[s0].add(w)
                yield
                for t in range(1, n):
                    s, sp = (t0 + t) % stages, (t0 + t - 1) % stages
                    yield from mach.wait(key("ready", s), ((t0 + t) // stages) & 1)
                    assert ring[s] == t0 + t and ring[sp] == t0 + t - 1, f"program {pid} wg{w}: ring at {t0 + t}"
                    ring_users[s].add(w)
                    yield
                    ring_users[sp].discard(w)
                    mach.bars[key("empty", sp)].arrive()
                sp = (t0 + n - 1) % stages
                assert ring[sp] == t0 + n - 1 and (kv_regs >= 2 or kv[0] == item)
                yield
                ring_users[sp].discard(w)
                mach.bars[key("empty", sp)].arrive()
                if kv_regs < 2:
                    kv_users.discard(w)
                    mach.bars[key("kv_empty")].arrive()
                assert (item, w) not in done
                done.add((item, w))
                yield
                t0 += n

        return {f"p{pid}": producer(), f"c{pid}.0": consumer(0), f"c{pid}.1": consumer(1)}

    agents = {}
    for pid in range(nprog):
        agents.update(program(pid))
    mach.run(agents, f"dkdv items {items}, {nprog} programs, kv_regs={kv_regs}")
    assert done == {(i, w) for i in range(len(items)) for w in range(2)}, "items missed"


def random_cases(cases, seed=27):
    """``cases`` random runs of each model; raises on the first failure."""
    rng = random.Random(seed)
    for _ in range(cases):
        items = [rng.randint(0, 7) for _ in range(rng.randint(1, 12))]
        nprog = rng.randint(1, min(4, len(items)))
        check_dq(items, nprog, rng.choice((2, 3)), rng.choice((2, 3)), rng.random() < 0.5, rng.randrange(1 << 30))
        items = [rng.randint(1, 9) for _ in range(rng.randint(1, 10))]
        check_dkdv(items, rng.randint(1, min(4, len(items))), rng.choice((3, 4)), rng.choice((0, 1, 2)),
                   rng.randrange(1 << 30))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=300)
    args = ap.parse_args()
    random_cases(args.cases)
    print(f"{args.cases} random cases of each model: no deadlock, every read of its own buffers, no refill in use")
