"""The Phase 2 CPU gate's order: weighted fair queueing by identity, sleeper credit,
slices handed over at checkpoints. Deterministic: a manual clock, no sleeps."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sessiond.server.phase2 import gate as gate_mod
from sessiond.server.phase2.gate import FairGate, Grant, bind, checkpoint, held, run_cpu


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_free_slot_is_granted_at_once_and_charged() -> None:
    async def main() -> None:
        clock = Clock()
        g = FairGate(1, clock=clock)
        grant = await g.acquire("a")
        clock.now = 0.25
        g.release(grant)
        assert g.vtime("a") == pytest.approx(0.25)
        assert g.waiting == 0

    asyncio.run(main())


def test_lowest_virtual_time_is_granted_first() -> None:
    async def main() -> None:
        clock = Clock()
        g = FairGate(1, clock=clock, sleeper_credit=100.0)  # no lift: own vtimes count
        order: list[str] = []
        # a used 1 s, b 0.1 s; they both become active again while x holds.
        for key, used in (("a", 1.0), ("b", 0.1)):
            gr = await g.acquire(key)
            clock.now += used
            g.release(gr)
        holder = await g.acquire("x")

        async def unit(key: str) -> None:
            gr = await g.acquire(key)
            order.append(key)
            g.release(gr)

        tasks = [asyncio.create_task(unit(k)) for k in ("a", "b", "a", "b")]
        await _settle()
        assert g.waiting == 4
        g.release(holder)
        await asyncio.gather(*tasks)
        # b (0.1) before a (1.0); no time passes, so b's second unit goes first too.
        assert order == ["b", "b", "a", "a"]

    asyncio.run(main())


def test_fifo_within_one_identity() -> None:
    async def main() -> None:
        g = FairGate(1, clock=Clock())
        holder = await g.acquire("a")
        order: list[int] = []

        async def unit(n: int) -> None:
            gr = await g.acquire("a")
            order.append(n)
            g.release(gr)

        tasks = []
        for n in range(5):
            tasks.append(asyncio.create_task(unit(n)))
            await _settle()
        g.release(holder)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]

    asyncio.run(main())


def test_returning_identity_starts_near_the_active_minimum() -> None:
    """A newcomer is not credited for all the time it was away: it starts at the
    lowest active virtual time less the sleeper credit, then takes turns fairly."""

    async def main() -> None:
        clock = Clock()
        g = FairGate(1, clock=clock, sleeper_credit=0.5)
        heavy = await g.acquire("heavy")
        clock.now = 10.0
        g.release(heavy)
        assert g.vtime("heavy") == pytest.approx(10.0)
        heavy = await g.acquire("heavy")  # heavy is active again at vtime 10
        light = asyncio.create_task(g.acquire("light"))
        await _settle()
        assert g.vtime("light") == pytest.approx(9.5)
        clock.now = 10.1
        g.release(heavy)
        grant = await light
        # light runs ahead until it has used its credit, and no further.
        clock.now = 10.7
        g.release(grant)
        assert g.vtime("light") == pytest.approx(10.1)
        assert g.vtime("heavy") == pytest.approx(10.1)

    asyncio.run(main())


def test_several_slots_are_granted_together() -> None:
    async def main() -> None:
        g = FairGate(2, clock=Clock())
        a = await g.acquire("a")
        b = await g.acquire("b")
        third = asyncio.create_task(g.acquire("c"))
        await _settle()
        assert not third.done()
        g.release(a)
        c = await asyncio.wait_for(third, 1)
        g.release(b)
        g.release(c)

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        g = FairGate(1, clock=Clock())
        holder = await g.acquire("a")
        waiter = asyncio.create_task(g.acquire("b"))
        await _settle()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert g.waiting == 0
        g.release(holder)
        again = await asyncio.wait_for(g.acquire("c"), 1)  # the slot is free again
        g.release(again)

    asyncio.run(main())


def test_checkpoint_hands_the_slot_to_a_lower_virtual_time() -> None:
    """A long unit of `heavy` in a gate thread yields at its first checkpoint after
    its slice once `light` waits; `light` runs, then `heavy` resumes."""

    async def main() -> None:
        clock = Clock()
        g = FairGate(1, clock=clock, slice_seconds=0.004, sleeper_credit=0.05)
        events: list[str] = []
        started = threading.Event()
        go_on = threading.Event()

        def long_unit() -> str:
            events.append("heavy starts")
            started.set()
            go_on.wait(5)
            clock.now += 0.010  # more than a slice of work
            checkpoint()  # light waits with a lower vtime: hand over, block
            events.append("heavy resumes")
            return "heavy done"

        with bind(g, "heavy"):
            heavy = asyncio.create_task(run_cpu(long_unit))
        await asyncio.to_thread(started.wait, 5)

        async def light_unit() -> None:
            with bind(g, "light"):
                async with held():
                    events.append("light runs")

        light = asyncio.create_task(light_unit())
        await _settle()
        assert g.waiting == 1
        go_on.set()
        await asyncio.wait_for(light, 5)
        assert await asyncio.wait_for(heavy, 5) == "heavy done"
        assert events == ["heavy starts", "light runs", "heavy resumes"]
        assert g.waiting == 0
        g.close()

    asyncio.run(main())


def test_checkpoint_keeps_the_slot_when_nobody_else_is_due() -> None:
    async def main() -> None:
        clock = Clock()
        g = FairGate(1, clock=clock, slice_seconds=0.004)
        grant = Grant("a", 0.0, g)
        with g._lock:  # held as `run` holds it
            g._activate("a")
            g._free -= 1
        clock.now = 1.0
        assert not g.yield_if_due(grant)  # nobody waits
        assert g.vtime("a") == pytest.approx(1.0)  # charged at the checkpoint
        g.release(grant)

    asyncio.run(main())


def test_unbound_helpers_run_plainly() -> None:
    async def main() -> None:
        assert await run_cpu(lambda: threading.current_thread().name) != "MainThread"
        async with held():
            pass
        checkpoint()  # outside a gate thread: nothing

    asyncio.run(main())


def test_cancelled_caller_does_not_free_a_slot_still_in_use() -> None:
    """`run`'s thread releases the slot itself: cancelling the awaiting task leaves
    the slot held until the thread's work ends."""

    async def main() -> None:
        g = FairGate(1)
        release = threading.Event()
        with bind(g, "a"):
            t = asyncio.create_task(run_cpu(lambda: release.wait(5)))
        await asyncio.sleep(0.05)
        t.cancel()
        await asyncio.sleep(0.05)
        other = asyncio.create_task(g.acquire("b"))
        await asyncio.sleep(0.05)
        assert not other.done()
        release.set()
        grant = await asyncio.wait_for(other, 5)
        g.release(grant)
        g.close()

    asyncio.run(main())


def test_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        FairGate(0)
    assert gate_mod.SLICE_SECONDS < 0.01  # "a few milliseconds"


def test_a_task_keeps_its_slot_parked_between_units_unless_a_lower_vtime_waits() -> None:
    """Between two units of one task the slot stays parked for it: a waiter of a
    higher virtual time does not get it, one of a lower virtual time takes it over
    at once, and the parking expires."""

    async def main() -> None:
        async def interleaving(park_seconds: float) -> list[str]:
            clock = Clock()
            g = FairGate(1, clock=clock, park_seconds=park_seconds, sleeper_credit=0.5)
            order: list[str] = []
            heavy_waits = asyncio.Event()

            async def units(key: str, n: int) -> None:
                with bind(g, key):
                    for i in range(n):
                        async with held():
                            order.append(f"{key}{i}")
                            clock.now += 0.001
                            if key == "light" and i == 0:
                                await heavy_waits.wait()
                        await asyncio.sleep(0)  # the gap between two units

            # "heavy" has used more: its waiter must not take "light"'s parked slot.
            gr = await g.acquire("heavy")
            clock.now = 1.0
            g.release(gr)
            light = asyncio.create_task(units("light", 3))
            await _settle()
            heavy = asyncio.create_task(units("heavy", 2))
            await _settle()
            assert g.waiting == 1
            heavy_waits.set()
            await asyncio.gather(light, heavy)
            g.close()
            return order

        assert await interleaving(0.05) == ["light0", "light1", "light2", "heavy0", "heavy1"]
        # Without parking the heavy waiter gets the slot at light's first unit's end.
        assert (await interleaving(0.0))[:2] == ["light0", "heavy0"]
        clock = Clock()
        g = FairGate(1, clock=clock, park_seconds=0.05, sleeper_credit=0.0)

        # A parked slot of a higher virtual time is taken over by a lower one at once.
        seat_task_parked = asyncio.Event()
        finish = asyncio.Event()

        async def heavy_parks() -> None:
            with bind(g, "heavy"):
                async with held():
                    clock.now += 1.0
                seat_task_parked.set()
                await finish.wait()

        h = asyncio.create_task(heavy_parks())
        await seat_task_parked.wait()
        assert len(g._parked) == 1
        light_grant = await asyncio.wait_for(g.acquire("light"), 1)
        assert g._parked == []
        g.release(light_grant)
        finish.set()
        await h

        # Parking expires by itself.
        with bind(g, "heavy"):
            async with held():
                pass
            assert len(g._parked) == 1
            await asyncio.sleep(0.1)
            assert g._parked == []
            again = await asyncio.wait_for(g.acquire("other"), 1)
            g.release(again)

    asyncio.run(main())


def test_a_taken_over_parking_is_granted_even_with_others_waiting() -> None:
    """A parked slot freed for a lower virtual time while another unit of the parked
    identity waits: the freed slot is granted (to the lower one), not lost."""

    async def main() -> None:
        clock = Clock()
        g = FairGate(1, clock=clock, park_seconds=10.0, sleeper_credit=0.05)
        parked = asyncio.Event()
        finish = asyncio.Event()

        async def heavy_parks() -> None:
            with bind(g, "heavy"):
                async with held():
                    clock.now += 1.0
                parked.set()
                await finish.wait()

        h = asyncio.create_task(heavy_parks())
        await parked.wait()
        second = asyncio.create_task(g.acquire("heavy"))  # same vtime: no takeover
        await _settle()
        assert not second.done() and len(g._parked) == 1
        light = await asyncio.wait_for(g.acquire("light"), 1)
        assert not second.done()
        g.release(light)
        g.release(await asyncio.wait_for(second, 1))
        finish.set()
        await h
        assert g.waiting == 0 and g._free == 1

    asyncio.run(main())
