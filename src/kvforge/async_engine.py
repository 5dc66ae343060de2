"""AsyncLLM: the engine's step loop in a background thread, one asyncio queue per request."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kvforge.engine import LLMEngine
from kvforge.errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from kvforge.outputs import RequestOutput
from kvforge.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_NUM_WORKERS = 4


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestOutput | BaseException]
    loop: asyncio.AbstractEventLoop


def _deliver(items: list[tuple[_Stream, Any]]) -> None:
    """On a stream's event loop: hand each item to its stream."""
    for stream, item in items:
        stream.queue.put_nowait(item)


class AsyncLLM:
    """Asyncio-facing wrapper of an :class:`LLMEngine` that runs in its own thread.

    The engine is single-threaded. Other threads never touch it: they submit commands
    (add, abort, read stats, embed) that the loop thread runs between steps, so a busy engine
    cannot starve them and they never block a step.

    ``engine`` may be a factory: the engine is then built on the loop thread (the constructor
    waits for it and re-raises its error). Servers should pass one. NOTE: with GNU OpenMP, a
    second thread running parallel regions next to an idle pool owned by the thread that loaded
    the model finds the CPUs "oversubscribed" and throttles its spin-waits; every kernel then
    pays a sleeping worker's wake-up (2.5x slower decode steps on two cores). Loading and
    stepping on one thread keeps a single pool.
    """

    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        max_queued_requests: int | None = None,
        num_workers: int = DEFAULT_NUM_WORKERS,
    ) -> None:
        self.max_queued_requests = max_queued_requests
        # Bounded pool for CPU work that must stay off the event loop and off the engine
        # thread: chat templates, tokenization, grammar compilation.
        self.workers = ThreadPoolExecutor(num_workers, thread_name_prefix="kvforge-worker")
        self._commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self.error: BaseException | None = None
        ready: Future[LLMEngine] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(engine, ready), name="kvforge-engine", daemon=True
        )
        self._thread.start()
        try:
            self.engine = ready.result()
        except BaseException:
            self.workers.shutdown(wait=False)
            raise

    # ----------------------------------------------------------------- state
    @property
    def is_healthy(self) -> bool:
        """False once the loop thread stopped or died."""
        return self.error is None and not self._stopped and self._thread.is_alive()

    @property
    def num_active(self) -> int:
        """Requests with an open stream."""
        return len(self._streams)

    def submit(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the engine thread before its next step."""
        future: Future[T] = Future()
        if not self.is_healthy:
            future.set_exception(EngineDeadError("the engine loop is not running"))
            return future
        self._commands.put((fn, future))
        self._wake.set()
        return future

    def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Blocking :meth:`submit` for threads other than the engine's."""
        return self.submit(fn).result()

    async def acall(self, fn: Callable[[LLMEngine], T]) -> T:
        """Awaitable :meth:`submit`."""
        return await asyncio.wrap_future(self.submit(fn))

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the bounded worker pool (never on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    # -------------------------------------------------------------- requests
    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as the engine produces them; abort if not consumed."""
        loop = asyncio.get_running_loop()
        stream = _Stream(asyncio.Queue(), loop)
        if params.structured_outputs is not None:
            # Compile in a worker thread (cached): the engine keeps stepping meanwhile.
            manager = await self.acall(lambda engine: engine.structured_outputs())
            await self.offload(manager.compile, params.structured_outputs)
        if isinstance(prompt, str) and "prompt_token_ids" not in kwargs:
            kwargs["prompt_token_ids"] = await self.offload(self.engine.tokenizer.encode, prompt)

        def add(engine: LLMEngine) -> None:
            waiting = len(engine.scheduler.waiting)
            if self.max_queued_requests is not None and waiting >= self.max_queued_requests:
                raise QueueFullError(
                    f"{waiting} requests are waiting, the limit is {self.max_queued_requests}"
                )
            engine.add_request(prompt, params, request_id=request_id, **kwargs)
            self._streams[request_id] = stream

        await self.acall(add)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request and free its blocks before the next step (does not wait)."""

        def do_abort(engine: LLMEngine) -> None:
            engine.abort_request(request_id)
            self._streams.pop(request_id, None)

        self.submit(do_abort)

    # ------------------------------------------------------------------ loop
    def _run(self, source: LLMEngine | Callable[[], LLMEngine], ready: Future[LLMEngine]) -> None:
        try:
            self.engine = source if isinstance(source, LLMEngine) else source()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the constructor
            ready.set_exception(exc)
            return
        ready.set_result(self.engine)
        try:
            while True:
                self._wake.clear()
                self._run_commands()
                if self._stopped:
                    return
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                else:
                    self._wake.wait(timeout=1.0)
        except BaseException as exc:  # noqa: BLE001 - surface any crash to every waiting caller
            logger.exception("engine loop died")
            self.error = exc
            self.engine.shutdown()
            self._fail_all(EngineDeadError(f"engine loop died: {exc}"))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.engine))
            except Exception as exc:  # noqa: BLE001 - delivered to the caller
                future.set_exception(exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        # One wake-up per event loop and step (each call_soon_threadsafe writes to the loop's
        # self-pipe: with 16 streams that was ~4% of the engine thread).
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            item: RequestOutput | BaseException = output
            if output.error is not None and output.error_status < 500:
                item = InvalidRequestError(output.error)
            elif output.error is not None:
                item = RequestFailedError(f"the request failed in the engine: {output.error}")
            batches.setdefault(stream.loop, []).append((stream, item))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
        self._streams.clear()
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight or ``timeout`` passes; True if idle."""
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._streams

    def shutdown(self) -> None:
        """Abort everything in flight and stop the loop thread."""
        if not self._thread.is_alive():
            return

        def stop(engine: LLMEngine) -> None:
            engine.abort_request(list(self._streams))
            self._stopped = True
            self._fail_all(EngineDeadError("the server is shutting down"))

        self.submit(stop)
        self._thread.join(timeout=10)
        if self.engine is not None:
            self.engine.shutdown()
        self.workers.shutdown(wait=False, cancel_futures=True)
