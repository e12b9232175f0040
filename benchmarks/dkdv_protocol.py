"""A host model of the Gluon dK/dV kernel's synchronisation in its pipelined form (kernels/gluon_backward.py,
``_dkdv_load`` and ``_dkdv_consumer``'s PIPELINE branch). Producer warp and consumer warpgroups run as coroutines over mbarriers with PTX's phase-parity semantics
(``flat_protocol.Barrier``, through ``persistent_protocol._Machine``); TMA copies land in a random order at random
times after they are issued, and a warpgroup's asynchronous products finish at random times before its waits.
For any number of query steps it checks that

* the program finishes (no deadlock) and each warpgroup runs every step once;
* every product reads the ring slot of its own step (step t's S^T / dP^T read slot t % STAGES, its dV / dK
  products, issued in step t + 1's round, still read it);
* the producer never refills a slot that a warpgroup's product may still read.

(Session 28 also modelled v36a, the warpgroups taking turns issuing their products; run 167 measured it slower and
it was removed with its half of this model.)

A change to the kernel's barrier code must be made here too. Usage: ``python benchmarks/dkdv_protocol.py
[--cases 300]`` or ``check(n, stages)``.
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persistent_protocol import _Machine  # noqa: E402


def check(n, stages=3, seed=0):
    """One program of ``n`` query steps (0 allowed: nothing runs) with a ring of ``stages`` slots. Returns the
    number of (warpgroup, step) pairs computed (2 n)."""
    assert stages >= 3, "the pipelined loop keeps step t - 1's slot while step t + 1's loads"
    mach = _Machine(seed)
    key = lambda name, i=0: (name, i)  # noqa: E731
    mach.bar(key("kv_bar"))
    for i in range(stages):
        mach.bar(key("ready", i)), mach.bar(key("empty", i), 2)
    ring, users = [None] * stages, [set() for _ in range(stages)]
    kv = [None]
    done = set()

    def producer():  # _dkdv_load: K / V once, then step t's Q / dO / lse / delta into slot t % stages
        mach.copy(key("kv_bar"), kv, 0, "kv")
        yield
        for t in range(n):
            s = t % stages
            yield from mach.wait(key("empty", s), ((t // stages) & 1) ^ 1)
            assert not users[s], f"slot {s} refilled for step {t} while {users[s]} may read it"
            mach.copy(key("ready", s), ring, s, t)
            yield

    def busy():  # a random stretch of the warpgroup's own work (products running, elementwise)
        for _ in range(mach.rng.randint(0, 4)):
            yield

    def consumer(w):  # _dkdv_consumer, PIPELINE
        yield from mach.wait(key("kv_bar"), 0)
        assert kv[0] == "kv"
        if n == 0:
            return
        yield from mach.wait(key("ready", 0), 0)
        assert ring[0] == 0, f"wg{w}: step 0 found slot 0 holding {ring[0]}"
        users[0].add(w)  # S^T_0, dP^T_0 in flight
        yield from busy()
        for t in range(1, n):
            s, sp = t % stages, (t - 1) % stages
            yield from mach.wait(key("ready", s), (t // stages) & 1)
            assert ring[s] == t and ring[sp] == t - 1, f"wg{w}: step {t} found slots {ring[s]}, {ring[sp]}"
            users[s].add(w)  # S^T_t, dV_{t-1}, dP^T_t, dK_{t-1} in flight (slot sp still read by dV / dK)
            yield from busy()  # the products run; the warpgroup waits for all of them within the step
            assert ring[s] == t and ring[sp] == t - 1, f"wg{w}: a slot was refilled under step {t}'s products"
            users[sp].discard(w)
            mach.bars[key("empty", sp)].arrive()
            done.add((w, t - 1))
            yield from busy()
        sp = (n - 1) % stages
        yield from busy()
        assert ring[sp] == n - 1, f"wg{w}: the last step's slot was refilled under its products"
        users[sp].discard(w)
        mach.bars[key("empty", sp)].arrive()
        done.add((w, n - 1))

    mach.run({"p": producer(), "c0": consumer(0), "c1": consumer(1)},
             f"dkdv n={n}, stages={stages}")
    assert done == {(w, t) for w in range(2) for t in range(n)}, "steps missed"
    return len(done)


def random_cases(cases, seed=36):
    """``cases`` random runs; raises on the first failure."""
    rng = random.Random(seed)
    for _ in range(cases):
        n, stages = rng.randint(0, 9), rng.choice((3, 4))
        check(n, stages, rng.randrange(1 << 30))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=300)
    args = ap.parse_args()
    random_cases(args.cases)
    print(f"{args.cases} random cases: no deadlock, every product on its own slot, no slot refilled under a "
          "product")
