"""AsyncEngine: the single-threaded Engine driven by one background thread, fed from asyncio.

What. One thread owns the `Engine`: it applies queued commands (add, abort, load/unload adapter) between steps,
runs `engine.step()` while there is work, and hands every RequestOutput to the asyncio loop that submitted the
request (`loop.call_soon_threadsafe` into that request's `asyncio.Queue`). `await submit(...)` returns a
`RequestStream` (an async iterator of RequestOutputs) once the engine has accepted the request, so a bad
request raises before any HTTP status is sent; `generate(...)` is the same as an async generator whose early
close (client disconnect, cancellation) aborts the request, which frees its cache blocks at the next step.
After each step and each batch of commands the thread publishes `stats` (the engine's `stats()` dict) and
`adapter_names`, which readers on other threads only replace, never mutate.

`num_waiting` counts requests accepted but not yet given their first token (queued for a slot or still in
prefill): the server refuses new ones with 429 above `--max-queue`.

Why a thread and not `run_in_executor` per step: the engine must never run two steps at once, and commands
must land between steps, never inside one; one owner thread gives both without locks around the model.

Rejected: a process per engine with IPC (vLLM's V1 design; it overlaps tokenization and the HTTP layer with the
GPU step, which matters at thousands of requests/s, not for a model this size, and doubles the moving parts);
asyncio.to_thread per step (steps could overlap with commands from other coroutines).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from .engine import Engine, RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("nanoseek.serve")


class RequestStream:
    """The outputs of one request, in order, on the asyncio loop that submitted it."""

    def __init__(self, owner: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id, self._owner, self._loop = request_id, owner, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.waiting = True  # accepted, no token yet
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None

    # engine thread -> loop
    def _push(self, item: RequestOutput | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        if self.waiting and (isinstance(item, BaseException) or item.new_token_ids or item.finished):
            self._owner._left_queue(self)
            if not isinstance(item, BaseException) and item.new_token_ids:
                self.first_token_at = time.perf_counter()
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop the request if it is still running (idempotent); its blocks are freed before the next step."""
        if not self.finished:
            self.finished = True
            self._owner._left_queue(self)
            self._owner.abort(self.request_id)


class AsyncEngine:
    """See the module docstring. `start()` the thread, `shutdown()` to abort everything and join it."""

    def __init__(self, engine: Engine, idle_poll_s: float = 0.05):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.eos_token_id = engine.eos_token_id
        self.adapter_names: list[str] = list(engine.adapter_names)
        self.stats: dict = dict(engine.stats())
        self.steps = 0
        self.error: str | None = None  # set if the engine thread died
        self._idle_poll_s = idle_poll_s
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort every request still running, stop the thread and wait for it."""
        if not self._thread.is_alive():
            return
        self._commands.put(self._abort_all)
        self._stop.set()
        self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def _left_queue(self, stream: RequestStream) -> None:
        with self._lock:
            if stream.waiting:
                stream.waiting = False
                self._num_waiting -= 1

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set() or not self._commands.empty():
                self._apply_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests() and not self._stop.is_set():
                    self._step()
        except BaseException as e:  # never silently: health turns 503 and every listener gets the error
            self.error = f"engine thread died: {e!r}"
            log.exception("engine thread died")
            for s in self._streams.values():
                s._push(RuntimeError(self.error))
            self._streams.clear()

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self._idle_poll_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            cmd()
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
        self._publish()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("engine step failed; aborting the running requests")
            self._abort_all(RuntimeError(f"engine step failed: {e!r}"))
            self._publish()
            return
        self.steps += 1
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._push(out)
            if out.finished:
                del self._streams[out.request_id]
        self._publish()

    def _publish(self) -> None:
        self.stats = dict(self.engine.stats())
        self.adapter_names = list(self.engine.adapter_names)

    def _abort_all(self, error: BaseException | None = None) -> None:
        for rid, s in list(self._streams.items()):
            self._abort_in_thread(rid)
            s._push(error or RuntimeError("the server is shutting down"))
        self._streams.clear()

    def _abort_in_thread(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except KeyError:  # already finished
            pass

    def _call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn in the engine thread between steps; its result or exception comes back in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def cmd():
            try:
                result = fn()
                self._publish()  # a caller that awaited a load sees the adapter in adapter_names
                fut.set_result(result)
            except Exception as e:
                fut.set_exception(e)

        if not self._thread.is_alive():
            fut.set_exception(RuntimeError(self.error or "the engine is not running"))
        else:
            self._commands.put(cmd)
        return fut

    # ------------------------------------------------------------------ the asyncio side
    async def submit(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                     request_id: str | None = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it. Raises the engine's
        ValueError (bad parameters, too long) or KeyError (unknown adapter)."""
        rid = request_id or uuid.uuid4().hex
        stream = RequestStream(self, rid, asyncio.get_running_loop())
        with self._lock:
            self._num_waiting += 1

        def add():
            self.engine.add_request(rid, prompt, params, adapter=adapter)
            self._streams[rid] = stream

        try:
            await asyncio.wrap_future(self._call(add))
        except asyncio.CancelledError:  # the client left while the request was being queued
            stream.abort()
            raise
        except BaseException:
            self._left_queue(stream)
            stream.finished = True
            raise
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; closing the generator early aborts the request."""
        stream = await self.submit(prompt, params, adapter, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self._abort_in_thread(request_id))

    async def load_adapter(self, name: str, path: str) -> None:
        """Engine.load_adapter between steps (ValueError with the reason; nothing changes on failure)."""
        await asyncio.wrap_future(self._call(lambda: self.engine.load_adapter(name, path)))

    async def unload_adapter(self, name: str) -> None:
        """Engine.unload_adapter between steps (KeyError if unknown)."""
        await asyncio.wrap_future(self._call(lambda: self.engine.unload_adapter(name)))
