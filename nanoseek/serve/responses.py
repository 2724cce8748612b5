"""OpenAI response bodies from engine outputs: collected answers, logprobs, and server-sent event streams.

What. `collect` wraps one request's RequestStream: it records usage, time to first token and inter-token gaps
into the metrics, writes the request's log line when it ends, and aborts the request if it is closed early
(client gone). `completion_chunks` / `chat_chunks` turn collected outputs into OpenAI's streaming chunks (`data:
{json}` events, a usage chunk when asked, `data: [DONE]` last; an engine failure after the 200 becomes an error
event). `completion_logprobs` / `chat_logprobs` build the two logprobs shapes. `unless_disconnected` lets a
non-streamed answer notice a client that hung up.

Why a module apart from server.py: the routes read as the API, this file as the wire format's details.

Rejected: one SSE generator per route with the bookkeeping inline (usage, metrics and abort-on-close would be
written twice).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from .async_engine import AsyncEngine, RequestStream
from .engine import RequestOutput
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
    error_body,
)

log = logging.getLogger("nanoseek.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass
class Record:
    """What one generation request did, for its log line and the metrics."""

    kind: str
    model: str
    prompt_tokens: int = 0
    generated: int = 0
    cached: int = 0
    finish: str | None = None
    status: int = 200
    ttft: float | None = None


async def collect(metrics: ServerMetrics, stream: RequestStream, rec: Record,
                  adapter: str | None) -> AsyncIterator[RequestOutput]:
    """The stream's outputs, with metrics, usage and the request's log line; aborts the request if closed early."""
    start = last = stream.submitted_at
    try:
        async for out in stream:
            now = time.perf_counter()
            n = len(out.new_token_ids)
            metrics.tokens(n, first=rec.generated == 0, since_s=now - last)
            if n:
                if rec.generated == 0:
                    rec.ttft = now - start
                last = now
            rec.generated = out.num_generated_tokens
            rec.prompt_tokens, rec.cached = out.num_prompt_tokens, out.num_cached_tokens
            if out.finished:
                rec.finish = out.finish_reason
            yield out
    except asyncio.CancelledError:
        rec.status, rec.finish = 499, "abort"  # nginx's "client closed request"
        raise
    except GeneratorExit:
        rec.status, rec.finish = 499, "abort"
        raise
    except Exception:
        rec.status = 500
        raise
    finally:
        stream.abort()
        metrics.request_done(rec.status, adapter, rec.prompt_tokens)
        ttft = f"{rec.ttft * 1e3:.0f}ms" if rec.ttft is not None else "-"
        log.info("%s model=%s status=%d prompt=%d cached=%d generated=%d finish=%s ttft=%s total=%.0fms",
                 rec.kind, rec.model, rec.status, rec.prompt_tokens, rec.cached, rec.generated, rec.finish, ttft,
                 (time.perf_counter() - start) * 1e3)


async def gather_outputs(outputs: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [o async for o in outputs]


async def unless_disconnected(request: Request, work):
    """Await work (a non-streamed answer); if the client hangs up first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():  # the client left
        task.cancel()
        raise APIError(499, "client closed the request")
    return task.result()


def usage_of(records: list[Record]) -> Usage:
    return Usage.of(sum(r.prompt_tokens for r in records), sum(r.generated for r in records),
                    sum(r.cached for r in records))


# ---------------------------------------------------------------------------------------------- logprobs
def _token_text(engine: AsyncEngine, token_id: int, as_id: bool) -> str:
    """A token's text (a lone byte of a multi-byte character decodes to U+FFFD), or vLLM's "token_id:N"."""
    return f"token_id:{token_id}" if as_id else engine.tokenizer.decode([token_id])


def completion_logprobs(engine: AsyncEngine, outs: list[RequestOutput], as_ids: bool,
                        offset: int = 0) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    for o in outs:
        for tid, (logprob, top) in zip(o.new_token_ids, o.new_logprobs or []):
            text = _token_text(engine, tid, as_ids)
            lp.tokens.append(text)
            lp.token_logprobs.append(logprob)
            lp.top_logprobs.append({_token_text(engine, t, as_ids): v for t, v in top.items()})
            lp.text_offset.append(offset)
            offset += len(text)
    return lp


def chat_logprobs(engine: AsyncEngine, outs: list[RequestOutput], as_ids: bool) -> ChatLogprobs:
    def entry(tid: int, logprob: float) -> dict:
        text = _token_text(engine, tid, as_ids)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [TokenLogprob(**entry(tid, logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in top.items()])
               for o in outs for tid, (logprob, top) in zip(o.new_token_ids, o.new_logprobs or [])]
    return ChatLogprobs(content=content)


# ---------------------------------------------------------------------------------------------- streaming
def sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj: CompletionResponse | ChatCompletionChunk) -> str:
    return f"data: {obj.model_dump_json(exclude_none=True)}\n\n"


def _error_event(message: str) -> str:
    return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) from several streams as they arrive; closing it closes (aborts) them all."""
    if len(streams) == 1:
        try:
            async for o in streams[0]:
                yield 0, o
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]):
        try:
            async for o in s:
                await queue.put((i, o))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


async def _stream_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An engine failure after the 200 went out becomes an error event, then [DONE]."""
    try:
        async for e in events:
            yield e
    except Exception as e:  # CancelledError (client gone) is a BaseException and passes through
        yield _error_event(f"generation failed: {e}")
    yield "data: [DONE]\n\n"


def completion_chunks(engine, rid: str, req: CompletionRequest, streams, records) -> AsyncIterator[str]:
    async def events():
        offsets = [0] * len(streams)
        async for i, o in _merged(streams):
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(engine, [o], req.return_tokens_as_token_ids, offsets[i])
                offsets[i] += sum(len(t) for t in lp.tokens)
            if o.new_text or o.finished or lp is not None:
                choice = CompletionChoice(index=i, text=o.new_text, logprobs=lp,
                                          finish_reason=o.finish_reason if o.finished else None)
                yield _event(CompletionResponse(id=rid, model=req.model, choices=[choice]))
        if req.include_usage:
            yield _event(CompletionResponse(id=rid, model=req.model, choices=[], usage=usage_of(records)))

    return _stream_errors(events())


def chat_chunks(engine, rid: str, req: ChatCompletionRequest, outputs, rec: Record) -> AsyncIterator[str]:
    def chunk(delta: ChatDelta, finish: str | None = None, logprobs=None) -> str:
        return _event(ChatCompletionChunk(id=rid, model=req.model, choices=[
            ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)]))

    async def events():
        yield chunk(ChatDelta(role="assistant", content=""))
        async for _, o in _merged([outputs]):
            lp = chat_logprobs(engine, [o], req.return_tokens_as_token_ids) if req.logprobs else None
            if o.new_text or lp is not None:
                yield chunk(ChatDelta(content=o.new_text), logprobs=lp)
            if o.finished:
                yield chunk(ChatDelta(), finish=o.finish_reason)
        if req.include_usage:
            yield _event(ChatCompletionChunk(id=rid, model=req.model, choices=[], usage=usage_of([rec])))

    return _stream_errors(events())
