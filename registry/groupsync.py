"""Group commit for a blocking sync call: many waiters, one sync at a time, each covered once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class GroupSync:
    """``await wait()`` returns once a sync() that *started after* the call has completed.

    Writers write first, then wait: every write is covered by a sync, and waiters that
    arrive while one runs share the next. sync runs in a worker thread; its exception
    goes to every waiter of that round.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # completed syncs (metrics and tests)

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="group-sync")
        await asyncio.shield(fut)

    async def _drain(self) -> None:
        try:
            while self._waiters:
                batch, self._waiters = self._waiters, []
                try:
                    await asyncio.to_thread(self._sync)
                except Exception as e:  # noqa: BLE001 - every waiter of this round hears of it, whatever it is
                    for fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                self.rounds += 1
                for fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._task = None
