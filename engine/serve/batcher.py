"""A small micro-batcher: concurrent requests coalesce into one model call.

Requests wait in a bounded queue; one worker takes the first, then keeps taking more until the
batch holds `max_batch` queries or `max_wait_ms` have passed since the first, groups them by what
must be equal within one search (k, mode, filters), and runs each group as one `Retriever.search`
on a single worker thread (the model is not thread-safe, and one BLAS thread per worker is what a
2-core machine affords). A full queue is refused at once (the caller answers 503), so the server
never grows without bound; a request past its deadline is dropped before it costs any work.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue holds max_queue requests: try again later."""


@dataclass
class Pending:
    texts: list
    key: tuple  # requests with the same key run in one search call
    deadline: float  # time.monotonic() past which nobody waits for the answer
    future: asyncio.Future
    queued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """`await submit(texts, key, timeout)` -> whatever `run(texts, key)` returns for these texts,
    computed in batches. `run(list of texts, key)` returns one result per text."""

    def __init__(self, run, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch=None):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000.0
        self.max_queue, self.on_batch = max_queue, on_batch
        self.queue: asyncio.Queue | None = None
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def start(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cvr-model")
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        """Answer what is queued, then stop (the server drains before exiting)."""
        if self._worker is None:
            return
        await self.queue.join()
        self._worker.cancel()
        self.executor.shutdown(wait=True)
        self._worker = None

    async def submit(self, texts: list, key: tuple, timeout: float):
        loop = asyncio.get_running_loop()
        pending = Pending(list(texts), key, time.monotonic() + timeout, loop.create_future())
        try:
            self.queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull from None
        return await asyncio.wait_for(asyncio.shield(pending.future), timeout)

    async def _serve(self) -> None:
        while True:
            batch = [await self.queue.get()]
            size = len(batch[0].texts)
            closes = time.monotonic() + self.max_wait
            while size < self.max_batch:
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                batch.append(item)
                size += len(item.texts)
            try:
                await self._run_batch(batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _run_batch(self, batch: list) -> None:
        now = time.monotonic()
        live = [p for p in batch if not p.future.done() and p.deadline > now]  # the late are not served

        def answer(i: int, result) -> None:
            future = live[i].future
            if future.done():
                return
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

        await answer_grouped([(p.texts, p.key) for p in live], self.run, self.executor, self.on_batch,
                             on_answer=answer, gone=lambda i: live[i].future.done())


async def answer_grouped(requests: list, run, executor, on_batch=None, on_answer=None, gone=None) -> list:
    """Answer requests [(texts, key)] with one `run(texts, key)` call per distinct key on
    `executor`: per request, its list of results or the exception it raised. A call that fails
    is run again request by request, so only the request that fails gets the error.
    `on_answer(i, answer)` hears each request's answer as soon as its group has run (not after
    every group); `gone(i)` says a request nobody waits for any more (it is not run alone)."""
    groups: dict = {}
    for i, (_, key) in enumerate(requests):
        groups.setdefault(key, []).append(i)
    loop = asyncio.get_running_loop()
    answers: list = [None] * len(requests)

    def settle(i: int, value) -> None:
        answers[i] = value
        if on_answer:
            on_answer(i, value)

    for key, members in groups.items():
        texts = [t for i in members for t in requests[i][0]]
        if on_batch:
            on_batch(len(texts))
        try:
            results = await loop.run_in_executor(executor, run, texts, key)
        except Exception as error:  # noqa: BLE001 - whose request failed is found below
            if len(members) == 1:
                settle(members[0], error)
                continue
            for i in members:
                if gone and gone(i):
                    continue
                try:
                    settle(i, await loop.run_in_executor(executor, run, requests[i][0], key))
                except Exception as alone:  # noqa: BLE001 - this request's own error
                    settle(i, alone)
            continue
        start = 0
        for i in members:
            settle(i, results[start : start + len(requests[i][0])])
            start += len(requests[i][0])
    return answers
