"""The model lock (Model._exclusive): bodies run whole, one at a time, even when their caller is cancelled."""

from __future__ import annotations

import asyncio
import types

import pytest

from optserve.server.model import Model


async def _turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def _model(inline: bool):
    return types.SimpleNamespace(_inline=inline, _lock=asyncio.Lock())


@pytest.mark.parametrize("inline", [True, False])
def test_a_body_that_waits_runs_to_its_end_holding_the_lock_though_its_caller_is_cancelled(inline):
    async def scenario():
        model = _model(inline)
        gate = asyncio.get_running_loop().create_future()
        trace = []

        async def waiting_body():
            trace.append("started")
            value = await gate  # suspends: the eager path hands it to a shielded task
            await asyncio.sleep(0)  # a bare yield, too
            trace.append(f"finished {value}")
            return value

        async def quick_body():
            trace.append("second")
            return "second"

        first = asyncio.ensure_future(Model._exclusive(model, waiting_body))
        await _turns()
        assert trace == ["started"] and model._lock.locked()
        first.cancel()  # the caller gives up; its body must still finish, still holding the lock
        second = asyncio.ensure_future(Model._exclusive(model, quick_body))
        await _turns()
        assert trace == ["started"]  # the second body waits for the lock
        gate.set_result(7)
        assert await second == "second"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert trace == ["started", "finished 7", "second"]
        assert not model._lock.locked()

    asyncio.run(scenario())


@pytest.mark.parametrize("inline", [True, False])
def test_a_body_that_fails_releases_the_lock_and_its_error_reaches_the_caller(inline):
    async def scenario():
        model = _model(inline)
        failing = asyncio.get_running_loop().create_future()

        async def fails_at_once():
            raise ValueError("at once")

        async def fails_later():
            await failing
            return "unreachable"

        with pytest.raises(ValueError, match="at once"):
            await Model._exclusive(model, fails_at_once)
        assert not model._lock.locked()
        later = asyncio.ensure_future(Model._exclusive(model, fails_later))
        await _turns()
        failing.set_exception(KeyError("later"))
        with pytest.raises(KeyError, match="later"):
            await later
        assert not model._lock.locked()

    asyncio.run(scenario())
