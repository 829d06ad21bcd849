"""Faust's aiokafka transport with one per-message cost removed.

Profiling the worker (py-spy, see the backbone issue's note) showed Faust's consumer
spending about a fifth of the main thread on ``Consumer._drain_messages`` handing each
message to the conductor with ``wait_first(callback(message), suspend_flow.wait())``: two
tasks created and cancelled per message, so that a rebalance can interrupt a callback that
blocks on flow control or a full buffer.

``FastDrainConsumer`` first runs the callback inline; almost always it completes without
suspending, and no task is made. Only when it does suspend is the rest of it raced against
``suspend_flow`` exactly as Faust does. Everything else (fetching, gaps, commits, acks,
rebalances) is Faust's own code. Registered as the ``fragrance`` transport through Faust's
``faust.transports`` entry point (pyproject.toml).

The override copies ``faust.transport.consumer.Consumer._drain_messages`` of
faust-streaming 0.15 (the dependency is pinned to that line); a test runs every worker
scenario through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import ServiceT
from mode import Service


class _Resume:
    """Awaitable continuing a coroutine that suspended on ``first`` after running inline."""

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        pending = self._first
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                self._coro.close()
                raise
            except BaseException as exc:  # cancellation and errors go to the coroutine
                try:
                    pending = self._coro.throw(exc)
                except StopIteration as done:
                    return done.value
                continue
            try:
                pending = self._coro.send(sent)
            except StopIteration as done:
                return done.value


class FastDrainConsumer(aiokafka_driver.Consumer):
    async def _deliver(self, message: Any) -> None:
        # The conductor's callback is a coroutine function (typed as returning Awaitable).
        coro = cast(Coroutine[Any, Any, None], self.callback(message))
        try:
            first = coro.send(None)
        except StopIteration:
            return  # the common case: delivered without suspending

        async def resume() -> None:
            await _Resume(coro, first)

        await self.wait_first(resume(), self.suspend_flow.wait())

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        deliver = self._deliver
        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = cast(AsyncIterator[Any], getmany(timeout=1.0))
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            await deliver(message)
                            set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class Transport(aiokafka_driver.Transport):
    Consumer = FastDrainConsumer
