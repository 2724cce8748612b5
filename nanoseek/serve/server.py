"""The OpenAI-compatible HTTP server: FastAPI over one AsyncEngine (`nanoseek serve`).

What.
    GET  /                        the chat page (static/chat.html)
    GET  /health                  200 {"status": "ok"} while the engine thread runs, else 503
    GET  /metrics                 Prometheus text (metrics.py)
    GET  /v1/models               the base (checkpoint directory name or --served-model-name) and every adapter
    POST /v1/completions          prompt: string, list of strings, token ids, or list of token-id lists
    POST /v1/chat/completions     messages rendered with the chat template `finetune` trains on (data/sft.py)
    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}  (vLLM's API; only with --adapter-root)
    POST /v1/unload_lora_adapter  {"lora_name"}
  `model` picks the base or an adapter. `stream: true` answers server-sent events in OpenAI's chunk shape ending
  with `data: [DONE]` (usage in a last chunk when stream_options.include_usage). Every error is OpenAI's JSON
  `{"error": {"message", "type", "param", "code"}}`: 400 malformed JSON / wrong types / out-of-range values /
  prompt + max_tokens over the context (FastAPI's 422 is turned into 400), 401 missing or wrong bearer token
  (--api-key; /v1/* only, as vLLM), 404 unknown model or route, 429 more than --max-queue requests waiting for
  their first token. A client that disconnects mid-stream aborts its request (Starlette cancels the response,
  the stream's `finally` aborts it in the engine, which frees its blocks). SIGTERM: uvicorn stops accepting,
  lets in-flight responses finish for `grace_s`, cancels the rest (aborting them), and the process exits 0.
  One log line per generation request; a throughput line every `log_every_s` while there is work.
  Response bodies, logprobs and the event streams are built in responses.py.

Why one engine object behind the app (`create_app(engine, settings)`): the same AsyncEngine can sit behind
two apps (the tests run a second one with an API key and a tiny queue), and the engine's lifetime is the
caller's: `serve()` owns it for the command line.

Rejected: one engine request per chat "n" choice (n > 1 is refused clearly instead: one choice per request keeps
usage and streaming simple); polling `request.is_disconnected()` for streams (Starlette already cancels a
streaming response on disconnect; only non-streamed answers poll); uvicorn's access log (it cannot say tokens or
latency).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.sft import encode_record
from .async_engine import AsyncEngine, RequestStream
from .engine import Engine
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
    error_body,
)
from .responses import (
    Record,
    chat_chunks,
    chat_logprobs,
    collect,
    completion_chunks,
    completion_logprobs,
    gather_outputs,
    sse,
    unless_disconnected,
    usage_of,
)

log = logging.getLogger("nanoseek.serve")
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass
class ServerSettings:
    model_name: str  # the base model's name in /v1/models and in requests' `model`
    api_key: str | None = None
    adapter_root: Path | None = None  # runtime load/unload only under this directory; None: disabled
    max_queue: int = 256  # requests waiting for their first token above this get 429
    log_every_s: float = 5.0


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics(lambda: engine.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def throughput_log():
            while True:
                await asyncio.sleep(settings.log_every_s)
                line = metrics.throughput_line()
                if line:
                    log.info(line)

        task = asyncio.create_task(throughput_log())
        yield
        task.cancel()

    app = FastAPI(title="nanoseek", description="OpenAI-compatible server over nanoseek's engine", lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {settings.api_key}".encode()):  # constant time
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def resolve_model(name: str) -> str | None:
        """The request's model -> None (the base) or an adapter name; 404 otherwise."""
        if name == settings.model_name:
            return None
        if name in engine.adapter_names:
            return name
        known = ", ".join([settings.model_name, *engine.adapter_names])
        raise APIError(404, f"model {name!r} does not exist; served models: {known}", param="model",
                       code="model_not_found")

    def admit(n: int) -> None:
        if not engine.alive:
            raise APIError(503, engine.error or "the engine is not running", type="server_error")
        if engine.num_waiting + n > settings.max_queue:
            raise APIError(429, f"server busy: {engine.num_waiting} requests already wait for a slot "
                                f"(--max-queue {settings.max_queue}); retry later", type="rate_limit_error",
                           code="queue_full")

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        log.info("%s %s %d %s", request.method, request.url.path, e.status, e.message)
        if request.url.path in GENERATION_ROUTES:  # refused before the engine saw it
            metrics.request_done(e.status, getattr(request.state, "adapter", "unresolved"))
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
            if len(e.errors()) > 1:
                message += f" (and {len(e.errors()) - 1} more error(s))"
        return await api_error(request, APIError(400, message, param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                                 type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {e!r}", "server_error"), status_code=500)

    # ------------------------------------------------------------------ plain routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> ModelList:
        base = ModelCard(id=settings.model_name, root=settings.model_name)
        return ModelList(data=[base] + [ModelCard(id=n, root=n, parent=settings.model_name)
                                        for n in engine.adapter_names])

    # ------------------------------------------------------------------ runtime adapters
    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize)])
    async def load_lora_adapter(req: LoadLoraRequest, request: Request):
        path = adapter_path(settings, req.lora_path)
        if req.lora_name == settings.model_name or req.lora_name in engine.adapter_names:
            raise APIError(400, f"lora_name {req.lora_name!r} is already served; unload it first",
                           param="lora_name")
        try:
            await engine.load_adapter(req.lora_name, str(path))
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise APIError(400, f"adapter {req.lora_name!r} at {req.lora_path!r} refused: {e}",
                           param="lora_path") from None
        log.info("%s %s 200 loaded adapter %s from %s", request.method, request.url.path, req.lora_name, path)
        return {"status": "ok", "lora_name": req.lora_name}

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize)])
    async def unload_lora_adapter(req: UnloadLoraRequest, request: Request):
        if settings.adapter_root is None:
            raise APIError(404, "runtime adapters are disabled: start the server with --adapter-root DIR",
                           code="runtime_adapters_disabled")
        try:
            await engine.unload_adapter(req.lora_name)
        except KeyError:
            raise APIError(404, f"adapter {req.lora_name!r} is not loaded", param="lora_name",
                           code="model_not_found") from None
        log.info("%s %s 200 unloaded adapter %s", request.method, request.url.path, req.lora_name)
        return {"status": "ok", "lora_name": req.lora_name}

    # ------------------------------------------------------------------ generation
    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest, request: Request):
        req.refuse_unsupported()
        adapter = request.state.adapter = resolve_model(req.model)
        prompts = [encode_prompt(engine, p, i) for i, p in enumerate(req.prompts())]
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        for ids in prompts:
            check_context(engine, len(ids), max_tokens)
        params = req.sampling_params(max_tokens, req.logprobs)
        records = [Record("completion", req.model, prompt_tokens=len(ids)) for ids in prompts]
        streams = await submit_all(engine, admit, prompts, params, adapter)
        outputs = [collect(metrics, s, r, adapter) for s, r in zip(streams, records)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return sse(completion_chunks(engine, rid, req, outputs, records))
        results = await unless_disconnected(request, asyncio.gather(*[gather_outputs(o) for o in outputs]))
        as_ids, want_lp = req.return_tokens_as_token_ids, req.logprobs is not None
        choices = [CompletionChoice(index=i, text="".join(o.new_text for o in outs), finish_reason=rec.finish,
                                    logprobs=completion_logprobs(engine, outs, as_ids) if want_lp else None)
                   for i, (outs, rec) in enumerate(zip(results, records))]
        return CompletionResponse(id=rid, model=req.model, choices=choices, usage=usage_of(records))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        req.refuse_unsupported()
        adapter = request.state.adapter = resolve_model(req.model)
        ids = chat_prompt(engine, req)
        max_tokens = req.requested_max_tokens
        if max_tokens is None:  # as vLLM: whatever the context leaves
            max_tokens = max(engine.max_model_len - len(ids), 1)
        check_context(engine, len(ids), max_tokens)
        params = req.sampling_params(max_tokens, req.num_logprobs)
        rec = Record("chat", req.model, prompt_tokens=len(ids))
        (stream,) = await submit_all(engine, admit, [ids], params, adapter)
        outputs = collect(metrics, stream, rec, adapter)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return sse(chat_chunks(engine, rid, req, outputs, rec))
        outs = await unless_disconnected(request, gather_outputs(outputs))
        logprobs = chat_logprobs(engine, outs, req.return_tokens_as_token_ids) if req.logprobs else None
        return ChatCompletionResponse(
            id=rid, model=req.model, usage=usage_of([rec]),
            choices=[ChatChoice(message=ChatMessageOut(content="".join(o.new_text for o in outs)),
                                logprobs=logprobs,
                                finish_reason=rec.finish)])

    return app


# ---------------------------------------------------------------------------------------------- requests
def adapter_path(settings: ServerSettings, lora_path: str) -> Path:
    """lora_path resolved (symlinks too) inside --adapter-root, or APIError."""
    if settings.adapter_root is None:
        raise APIError(404, "runtime adapters are disabled: start the server with --adapter-root DIR",
                       code="runtime_adapters_disabled")
    root = settings.adapter_root.resolve()
    path = (root / lora_path).resolve()  # an absolute lora_path replaces root; ".." and symlinks are followed
    if not path.is_relative_to(root):
        raise APIError(400, f"lora_path {lora_path!r} resolves to {path}, outside --adapter-root {root}",
                       param="lora_path", code="path_outside_adapter_root")
    if not path.is_dir():
        raise APIError(400, f"lora_path {lora_path!r}: no such adapter directory under --adapter-root",
                       param="lora_path")
    return path


def encode_prompt(engine: AsyncEngine, prompt: str | list[int], index: int) -> list[int]:
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    else:
        vocab = engine.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt[{index}]: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                           param="prompt")
        ids = list(prompt)
    if not ids:
        raise APIError(400, f"prompt[{index}] is empty", param="prompt")
    return ids


def chat_prompt(engine: AsyncEngine, req: ChatCompletionRequest) -> list[int]:
    """The messages as `finetune` tokenizes a chat record, up to the assistant header of the reply to generate."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    # an empty assistant turn ends with the header then EOS: drop the EOS, keep the header ("<|assistant|>\n")
    return list(encode_record(engine.tokenizer, {"messages": [*messages, {"role": "assistant", "content": ""}]},
                              "messages").ids[:-1])


def check_context(engine: AsyncEngine, prompt_len: int, max_tokens: int) -> None:
    if prompt_len + max_tokens > engine.max_model_len:
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) = "
                            f"{prompt_len + max_tokens} exceeds the model's context of {engine.max_model_len} "
                            "tokens; shorten the prompt or lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")


async def submit_all(engine: AsyncEngine, admit, prompts: list[list[int]], params, adapter) -> list[RequestStream]:
    """Submit every prompt, or none: an engine refusal aborts the ones already queued and becomes a 400/404."""
    admit(len(prompts))
    streams: list[RequestStream] = []
    try:
        for ids in prompts:
            streams.append(await engine.submit(ids, params, adapter))
    except BaseException as e:
        for s in streams:
            s.abort()
        if isinstance(e, KeyError):
            raise APIError(404, f"model {adapter!r} does not exist", param="model", code="model_not_found") from None
        if isinstance(e, ValueError):
            raise APIError(400, str(e)) from None
        raise
    return streams


# ---------------------------------------------------------------------------------------------- the command
class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame) -> None:
        """Graceful stop on SIGTERM/SIGINT without re-raising the signal afterwards (uvicorn's default), so the
        process exits 0 once in-flight requests are done or cancelled."""
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            log.info("signal %d: no new requests; finishing in-flight ones", sig)
            self.should_exit = True


class ServerThread:
    """Run an app under uvicorn in a background thread on host:port (port 0: a free one), for tests and the
    HTTP benchmark: `with ServerThread(app) as srv: httpx.get(srv.url + "/health")`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, grace_s: float = 1.0):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.url = f"http://{host}:{self._sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=grace_s))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()


def parse_adapters(specs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
        if name in out:
            raise ValueError(f"--adapter name {name!r} given twice")
        out[name] = path
    return out


def serve(args: argparse.Namespace) -> int:
    """`nanoseek serve`: load the engine, run uvicorn until SIGTERM/SIGINT, then stop the engine; exit 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--checkpoint {ckpt}: no such directory")
    adapters = parse_adapters(args.adapter or [])
    for name, path in adapters.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {name}={path}: no such directory")
    root = Path(args.adapter_root) if args.adapter_root else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--adapter-root {root}: no such directory")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.grace < 0:
        raise ValueError(f"--grace must be >= 0, got {args.grace}")
    if args.num_speculative_tokens is not None and not args.speculative:
        raise ValueError(f"--num-speculative-tokens {args.num_speculative_tokens} needs --speculative")
    if args.num_speculative_tokens is not None and args.num_speculative_tokens < 1:
        raise ValueError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    fields = {k: getattr(args, k) for k in ("max_batch_tokens", "max_loras", "kv_cache_tokens", "block_size",
                                            "max_num_seqs", "dtype", "device", "speculative",
                                            "num_speculative_tokens") if getattr(args, k) is not None}
    name = args.served_model_name or ckpt.resolve().name
    if name in adapters:
        raise ValueError(f"--adapter name {name!r} is also the base model's name; rename one")
    log.info("loading %s with adapters %s", ckpt, ", ".join(adapters) or "(none)")
    engine = AsyncEngine(Engine.from_checkpoint(str(ckpt), adapters=adapters, **fields)).start()
    settings = ServerSettings(model_name=name, api_key=args.api_key, adapter_root=root, max_queue=args.max_queue)
    app = create_app(engine, settings)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=args.grace))
    log.info("serving %r on http://%s:%d (chat page at /, OpenAI API at /v1)", name, args.host, args.port)
    try:
        server.run()
    finally:
        engine.shutdown()
    log.info("stopped")
    return 0
