"""A host model of the flat persistent forward's synchronisation (kernels/gluon_flat.py): the producer warp and the
two consumer warpgroups as coroutines over mbarriers with PTX's phase-parity semantics, run by a scheduler that
tries every runnable agent in turn. It checks, for any list of per-item key-tile counts, that

* the program finishes (no deadlock: some agent can always move until all are done),
* every Q K^T reads the Q buffer holding its item and the K slot holding its ring position, every P V the V slot
  of its position, and every epilogue stages its output in its own item's Q buffer,
* the producer never refills a K/V slot or a Q buffer that a consumer is still reading (issue .. release),
* the two warpgroups alternate on the tensor cores in the round order the turn barriers promise.

It mirrors the kernel's barrier operations line by line (gluon_loads' ``_load_persistent`` with FLAT,
gluon_common's ``turn_wait``, gluon_forward_steps' ``pv_issue``; gluon_flat's ``consumer_flat`` and ``_item_rounds``); a change to one must be
made to the other. Usage:
``python benchmarks/flat_protocol.py [--cases 2000]`` (random cases), or ``check(n_items, k_stages, v_stages)``.
"""
import argparse
import random


class Barrier:
    """An mbarrier: ``count`` arrivals complete a phase; wait(parity) passes once the phase of that parity has
    completed (the initial state counts the phase before phase 0, of parity 1, as completed)."""

    def __init__(self, name, count):
        self.name, self.count, self.pending, self.completed = name, count, 0, 0

    def arrive(self):
        self.pending += 1
        if self.pending == self.count:
            self.pending = 0
            self.completed += 1

    def passes(self, parity):
        return self.completed % 2 != parity


class Deadlock(Exception):
    pass


def check(n_items, k_stages=2, v_stages=2, seed=0):
    """Run the model for one program whose items have ``n_items`` key tiles each (every entry >= 1, the flat
    kernel's precondition). TMA copies land in a random order at random times after their issue (``seed``), each
    one writing its buffer and arriving on its barrier when it lands. Returns the tensor-core round log; raises
    AssertionError or Deadlock."""
    assert n_items and all(n >= 1 for n in n_items)
    rng = random.Random(seed)
    in_flight = []  # (barrier, buffer list, index, value) of issued TMA copies that have not landed
    m = len(n_items)
    bars = {}

    def bar(name, count=1):
        if name not in bars:
            bars[name] = Barrier(name, count)
        return bars[name]
    for i in range(k_stages):
        bar(("k_ready", i)), bar(("k_empty", i), 2)
    for i in range(v_stages):
        bar(("v_ready", i)), bar(("v_empty", i), 2)
    for i in range(4):
        bar(("q_bars", i)), bar(("q_empty", i))
    for i in range(2):
        bar(("turn", i))
    k_slot, v_slot, q_buf = [None] * k_stages, [None] * v_stages, [None] * 4
    k_users, v_users, q_users = [set() for _ in range(k_stages)], [set() for _ in range(v_stages)], \
        [set() for _ in range(4)]
    rounds = []  # (warpgroup, round) in the order the matmuls were issued

    def wait(name, parity):
        while not bars[name].passes(parity):
            yield
        # a wait that passes takes no step of its own

    def producer():
        t0 = 0
        for it, n in enumerate(n_items):
            qb = 2 * (it % 2)
            for w in range(2):  # both warpgroups' buffers released, then both loads (_load_partition)
                yield from wait(("q_empty", qb + w), ((it // 2) & 1) ^ 1)
            for w in range(2):
                assert not q_users[qb + w], f"Q buffer {qb + w} refilled while in use by {q_users[qb + w]}"
                in_flight.append((("q_bars", qb + w), q_buf, qb + w, it))
                yield
            for j in range(n):
                t = t0 + j
                ks = t % k_stages
                yield from wait(("k_empty", ks), ((t // k_stages) & 1) ^ 1)
                assert not k_users[ks], f"K slot {ks} refilled while in use"
                in_flight.append((("k_ready", ks), k_slot, ks, t))
                yield
                vs = t % v_stages
                yield from wait(("v_empty", vs), ((t // v_stages) & 1) ^ 1)
                assert not v_users[vs], f"V slot {vs} refilled while in use"
                in_flight.append((("v_ready", vs), v_slot, vs, t))
                yield
            t0 += n

    def consumer(w):
        def turn_wait(r):
            if w == 0:
                yield from wait(("turn", 0), (r & 1) ^ 1)
            else:
                yield from wait(("turn", 1), r & 1)
            rounds.append((w, r))

        def qk(it, t):  # _qk_issue: Q view of item it, K tile at ring position t
            qi = 2 * (it % 2) + w
            ks = t % k_stages
            yield from wait(("k_ready", ks), (t // k_stages) & 1)
            assert q_buf[qi] == it, f"wg{w}: Q K^T of item {it} read buffer {qi} holding item {q_buf[qi]}"
            assert k_slot[ks] == t, f"wg{w}: Q K^T of position {t} read K slot {ks} holding {k_slot[ks]}"
            q_users[qi].add(w)
            k_users[ks].add(w)

        def pv(t):  # pv_issue (gluon_forward_steps): V tile at ring position t, then hand the tensor cores over
            vs = t % v_stages
            yield from wait(("v_ready", vs), (t // v_stages) & 1)
            assert v_slot[vs] == t, f"wg{w}: P V of position {t} read V slot {vs} holding {v_slot[vs]}"
            v_users[vs].add(w)
            bars[("turn", 1 - w)].arrive()

        def release_k(t):
            k_users[t % k_stages].discard(w)
            bars[("k_empty", t % k_stages)].arrive()

        def release_v(t):
            v_users[t % v_stages].discard(w)
            bars[("v_empty", t % v_stages)].arrive()

        def item_rounds(it, t, n):
            for j in range(1, n):
                yield from turn_wait(t + j)
                yield from qk(it, t + j)
                yield from pv(t + j - 1)
                yield
                release_k(t + j)
                release_v(t + j - 1)

        def epilogue(it):
            qi = 2 * (it % 2) + w
            assert q_buf[qi] == it, f"wg{w}: item {it}'s output staged in buffer {qi} holding item {q_buf[qi]}"
            yield

        t = 0
        yield from wait(("q_bars", w), 0)
        yield from turn_wait(t)
        yield from qk(0, t)
        bars[("turn", 1 - w)].arrive()
        yield
        release_k(0)
        for it in range(m - 1):
            n = n_items[it]
            yield from item_rounds(it, t, n)
            yield from turn_wait(t + n)
            yield from wait(("q_bars", 2 * ((it + 1) % 2) + w), ((it + 1) // 2) & 1)
            yield from qk(it + 1, t + n)
            yield from pv(t + n - 1)
            yield
            release_k(t + n)
            release_v(t + n - 1)
            yield from epilogue(it)
            qi = 2 * (it % 2) + w
            q_users[qi].discard(w)
            bars[("q_empty", qi)].arrive()
            t += n
        n = n_items[m - 1]
        yield from item_rounds(m - 1, t, n)
        yield from turn_wait(t + n)
        yield from pv(t + n - 1)
        yield
        release_v(t + n - 1)
        yield from epilogue(m - 1)
        q_users[2 * ((m - 1) % 2) + w].discard(w)

    def tma():  # the copy engine: now and then lands an in-flight copy (a random one), until the producer is done
        while "producer" in agents or in_flight:
            if in_flight and rng.random() < 0.3:
                name, buf, i, value = in_flight.pop(rng.randrange(len(in_flight)))
                buf[i] = value
                bars[name].arrive()
            yield

    agents = {"producer": producer(), "wg0": consumer(0), "wg1": consumer(1)}
    agents["tma"] = tma()
    idle = 0  # scheduler passes in a row in which nothing changed (copies land at random: allow many)
    while agents:
        state = tuple(b.completed * 64 + b.pending for b in bars.values()) + (len(rounds), len(agents),
                                                                              len(in_flight))
        for name in list(agents):
            try:
                next(agents[name])
            except StopIteration:
                del agents[name]
        new = tuple(b.completed * 64 + b.pending for b in bars.values()) + (len(rounds), len(agents),
                                                                            len(in_flight))
        idle = idle + 1 if new == state else 0
        if agents and idle > 200:
            raise Deadlock(f"stuck: {sorted(agents)} with items {n_items}")
    total = sum(n_items)
    want = [(w, r) for r in range(total + 1) for w in (0, 1)]
    assert rounds == want, f"tensor-core rounds out of order: {rounds[:12]} ..."
    return rounds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    for _ in range(a.cases):
        items = [rng.randint(1, 9) for _ in range(rng.randint(1, 7))]
        check(items, rng.choice((2, 3, 4)), rng.choice((2, 3)), seed=rng.randrange(1 << 30))
    print(f"{a.cases} random programs: no deadlock, every read of its own tile, no refill in use, rounds in order")


if __name__ == "__main__":
    main()
