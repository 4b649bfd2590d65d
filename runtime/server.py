"""The OpenAI- and Mistral-compatible HTTP API over continuous batching (runtime/batch.py): `mamba-cli serve`.

    POST /v1/chat/completions   messages -> the model's chat format (runtime/chat.py) -> a batched sequence;
                                one JSON reply, or with "stream" server-sent events ending in `data: [DONE]`
    POST /v1/completions        a raw prompt (text or token ids), the same way
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"} and the batcher's load (never needs the API key)

Requests are checked against the fields below (FIELDS): unknown fields are refused, fields that name a
feature this server lacks (tools, logprobs, n > 1, ...) are accepted only at their "off" value, null is
the same as absent. Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}:

    400  malformed JSON, not an object, an unknown field, a prompt past the context or max_tokens past
         the server's limit (with the numbers)
    401  a missing or wrong bearer token when the server has an API key
    404 / 405   no such endpoint / method
    413  a body larger than the limit
    422  a required field missing, or a field of the wrong type or out of range
    429  every row decoding and the queue full (Retry-After: 1)
    500  a decode step failed (every sequence in it ends with the error; the server goes on)
    503  the server is shutting down

Each request's text is rendered and tokenized in a worker thread; its sequence's events cross from the
batcher's thread to the event loop through an asyncio queue. A client that goes away cancels its
sequence (its row is free at the next step). Ctrl-C (SIGINT) or SIGTERM ends every stream in flight
with an error event and `[DONE]`, then the port is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.batch import Batcher, Event, QueueFull, Request
from runtime.chat import chat_prompt
from runtime.errors import MambaCliError


@dataclass
class Limits:
    max_seqs: int = 8  # sequences decoded together (rows of the batch)
    max_queue: int = 32  # requests waiting for a row; more get 429
    max_body: int = 4 * 2**20  # request body bytes; more get 413
    max_tokens: int = 4096  # the most tokens one reply may ask for (and the default when a request names none)
    keep: int = 4  # finished conversations kept for prefix reuse


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), self.status,
                            headers=self.headers)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def invalid(param: str, message: str) -> APIError:
    return APIError(422, f"{param}: {message}", param, "invalid_value")


# ---------------------------------------------------------------- request fields

Check = Callable[[str, Any], Any]


def number(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise invalid(name, f"expected a number, got {json.dumps(v)[:40]}")
        if v < lo or v > hi or (lo_open and v == lo):
            raise invalid(name, f"{v} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
        return float(v)
    return check


def integer(lo: int, hi: int = 2**64 - 1) -> Check:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(name, f"expected an integer, got {json.dumps(v)[:40]}")
        if not lo <= v <= hi:
            raise invalid(name, f"{v} is out of range [{lo}, {hi}]")
        return v
    return check


def boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise invalid(name, f"expected true or false, got {json.dumps(v)[:40]}")
    return v


def string(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise invalid(name, f"expected a string, got {json.dumps(v)[:40]}")
    return v


def anything(name: str, v: Any) -> Any:
    return v


def only(*allowed: Any, what: str = "") -> Check:
    """A field of a feature this server lacks: accepted at its 'off' values only."""
    def check(name: str, v: Any) -> Any:
        if v not in allowed:
            raise invalid(name, f"only {' or '.join(json.dumps(a) for a in allowed)} is supported{what}")
        return v
    return check


def stop_strings(name: str, v: Any) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > 16:
        raise invalid(name, "expected a string or a list of at most 16 strings")
    return [s for s in items if s]


def stream_options(name: str, v: Any) -> dict:
    if not isinstance(v, dict) or set(v) - {"include_usage", "continuous_usage_stats"}:
        raise invalid(name, 'expected {"include_usage": true|false}')
    return {"include_usage": boolean(f"{name}.include_usage", v.get("include_usage", False))}


def response_format(name: str, v: Any) -> dict:
    if not isinstance(v, dict) or v.get("type") != "text":
        raise invalid(name, 'only {"type": "text"} is supported')
    return v


def messages(name: str, v: Any) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise invalid(name, "expected a non-empty list of messages")
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise invalid(name, f"message {i} is not an object")
        parts = m.get("content")
        if isinstance(parts, list) and any(not isinstance(p, dict) or p.get("type", "text") != "text"
                                           for p in parts):
            raise invalid(name, f"message {i}: only text content parts are supported")
        if m.get("tool_calls"):
            raise invalid(name, f"message {i}: tool calls are not supported")
    return v


def prompt(name: str, v: Any) -> str | list[int]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        return v
    raise invalid(name, "expected a string, or a non-empty list of token ids (one prompt per request)")


SEED = integer(-(2**63), 2**64 - 1)
COMMON: dict[str, Check] = {
    "model": string, "stream": boolean, "stream_options": stream_options,
    "temperature": number(0, 2), "top_p": number(0, 1, lo_open=True), "top_k": integer(0),
    "min_p": number(0, 1), "max_tokens": integer(1), "max_completion_tokens": integer(1),
    "stop": stop_strings, "seed": SEED, "random_seed": SEED, "n": only(1, what=" (one choice per request)"),
    "presence_penalty": number(-2, 2), "frequency_penalty": number(-2, 2),
    "repetition_penalty": number(0, 10, lo_open=True), "ignore_eos": boolean,
    "user": string, "metadata": anything, "prompt_cache_key": string, "service_tier": anything,
    "logprobs": only(False, 0), "top_logprobs": only(0), "logit_bias": only({}),
}
FIELDS: dict[str, dict[str, Check]] = {
    "chat": {**COMMON, "messages": messages, "response_format": response_format, "tools": only([]),
             "tool_choice": only("none", "auto"), "parallel_tool_calls": boolean, "safe_prompt": only(False),
             "prompt_mode": only(None), "min_tokens": only(0)},
    "completion": {**COMMON, "prompt": prompt, "echo": only(False), "suffix": only(""), "best_of": only(1)},
}
REQUIRED = {"chat": "messages", "completion": "prompt"}


def parse(kind: str, body: bytes) -> dict[str, Any]:
    """A request body -> its checked fields (null fields dropped)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    fields = FIELDS[kind]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_field")
    out = {k: fields[k](k, v) for k, v in data.items() if v is not None}
    if REQUIRED[kind] not in out:
        raise APIError(422, f"Missing required parameter: '{REQUIRED[kind]}'", REQUIRED[kind], "missing_field")
    return out


# ---------------------------------------------------------------- the app


class Server:
    """The HTTP side: one model, one Batcher, the limits and the optional API key."""

    def __init__(self, model, name: str, limits: Limits, api_key: str | None = None):
        self.model, self.name, self.limits, self.api_key = model, name, limits, api_key
        self.batcher = Batcher(model, limits.max_seqs, limits.max_queue, limits.keep)
        self.created = int(time.time())

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.batcher.start()
            yield
            await run_in_threadpool(self.batcher.close)

        async def api_error(request, exc: APIError) -> Response:
            return exc.response()

        async def http_error(request, exc: HTTPException) -> Response:
            return APIError(exc.status_code, exc.detail or "error").response()

        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"])]
        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={APIError: api_error, HTTPException: http_error})

    # ---- endpoints

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.name, **self.batcher.load()})

    async def models(self, request: HTTPRequest) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "mamba-cli"}]})

    async def chat(self, request: HTTPRequest) -> Response:
        return await self.complete(request, "chat")

    async def completions(self, request: HTTPRequest) -> Response:
        return await self.complete(request, "completion")

    # ---- the shared path

    def authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def body(self, request: HTTPRequest) -> bytes:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > self.limits.max_body:
            raise self.too_large()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body:
                raise self.too_large()
        return bytes(body)

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.limits.max_body} "
                             "bytes (--max-body)", code="request_too_large")

    def build(self, kind: str, f: dict[str, Any]) -> Request:
        """Checked fields -> a batch Request: the prompt rendered and tokenized, the limits applied."""
        m = self.model
        stop = f.get("stop", [])
        try:
            if kind == "chat":
                ids, format_stop = chat_prompt(m, f["messages"])
                stop = stop + format_stop
            elif isinstance(f["prompt"], str):
                ids = m.tokenizer.encode_prompt(f["prompt"])
            else:
                ids = f["prompt"]
                vocab = m.args.vocab_size
                if max(ids) >= vocab:
                    raise invalid("prompt", f"token id {max(ids)} is outside the vocabulary (0..{vocab - 1})")
        except MambaCliError as e:
            raise invalid("messages" if kind == "chat" else "prompt", str(e)) from None
        if not ids:
            raise invalid("prompt", "the prompt is empty")
        asked = f.get("max_tokens", f.get("max_completion_tokens"))
        cap, context = self.limits.max_tokens, m.context_length
        if asked is not None and asked > cap:
            raise APIError(400, f"max_tokens is {asked}, more than this server's limit of {cap} (--max-tokens)",
                           "max_tokens", "max_tokens_exceeded")
        if context and len(ids) + (asked or 1) > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{len(ids) + (asked or 1)} tokens ({len(ids)} in the prompt, {asked or 1} in the "
                                f"completion). Please reduce the length of the prompt or of max_tokens.",
                           "messages" if kind == "chat" else "prompt", "context_length_exceeded")
        budget = asked if asked is not None else min(cap, context - len(ids)) if context else cap
        seed = f.get("seed", f.get("random_seed"))
        return Request(ids, budget, temperature=f.get("temperature", 1.0), top_p=f.get("top_p", 1.0),
                       top_k=f.get("top_k", 0), min_p=f.get("min_p", 0.0), seed=seed, stop=stop,
                       stop_ids=[] if f.get("ignore_eos") else None,
                       presence_penalty=f.get("presence_penalty", 0.0),
                       frequency_penalty=f.get("frequency_penalty", 0.0),
                       repetition_penalty=f.get("repetition_penalty", 1.0))

    async def complete(self, request: HTTPRequest, kind: str) -> Response:
        self.authorize(request)
        fields = parse(kind, await self.body(request))
        req = await run_in_threadpool(self.build, kind, fields)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:  # called on the batcher's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            seq = self.batcher.submit(req, emit)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"}) \
                from None
        except MambaCliError as e:
            raise APIError(503, str(e), code="shutting_down", kind="server_error") from None
        reply = Reply(self.name, kind, fields)
        if fields.get("stream"):
            return EventStream(self.stream(reply, events), lambda: self.batcher.cancel(seq))
        try:
            text, finish = await until_disconnected(request, collect(events))
        finally:
            self.batcher.cancel(seq)  # a no-op once it has finished
        if finish is None:
            return Response(status_code=499)  # the client is gone: nobody reads this
        if isinstance(finish, tuple):
            return JSONResponse(reply.whole(text, finish[0], finish[1]))
        if self.batcher.closed:
            return APIError(503, finish.error, code="shutting_down", kind="server_error").response()
        return APIError(500, finish.error, code="server_error", kind="server_error").response()

    async def stream(self, reply: Reply, events: asyncio.Queue[Event]) -> AsyncIterator[str]:
        """The SSE chunks of a reply, as its events arrive."""
        yield sse(reply.chunk(role=True))
        while True:
            ev = await events.get()
            if ev.error:
                code = "shutting_down" if self.batcher.closed else "server_error"
                yield sse(error_body(ev.error, "server_error", code=code))
                break
            if ev.text:
                yield sse(reply.chunk(text=ev.text))
            if ev.finish:
                for chunk in reply.last(ev.finish, ev.usage):
                    yield sse(chunk)
                break
        yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A server-sent event stream that runs `on_close` however it ends: done, or cancelled by Starlette
    when the client disconnects (even before the first chunk), or failed on a closed connection."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def collect(events: asyncio.Queue[Event]) -> tuple[str, Any]:
    """(text, (finish_reason, usage)) of a whole reply, or (text, the error Event)."""
    parts = []
    while True:
        ev = await events.get()
        if ev.error:
            return "".join(parts), ev
        parts.append(ev.text)
        if ev.finish:
            return "".join(parts), (ev.finish, ev.usage)


async def until_disconnected(request: HTTPRequest, work) -> tuple[str, Any]:
    """Await `work`; (text, None) if the client disconnects first."""
    result: list = []

    async def run(scope: anyio.CancelScope) -> None:
        result.append(await work)
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg.cancel_scope)
        tg.start_soon(watch, tg.cancel_scope)
    return result[0] if result else ("", None)


class Reply:
    """The response objects of one request, in OpenAI's shapes (which Mistral's client also parses)."""

    def __init__(self, model: str, kind: str, fields: dict[str, Any]):
        self.model, self.kind = model, kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage = fields.get("stream_options", {}).get("include_usage", False)

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(u: dict[str, int]) -> dict:
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return {**self.head("chat.completion"), "choices": [choice], "usage": self.usage(usage)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self.head("text_completion"), "choices": [choice], "usage": self.usage(usage)}

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text or not finish else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self.head("text_completion"), "choices": [choice]}

    def last(self, finish: str, usage: dict[str, int]) -> list[dict]:
        """The finishing chunk, with the usage (or, when stream_options asked for it, a usage-only chunk
        after it, as OpenAI sends it)."""
        end = self.chunk(finish=finish)
        if not self.include_usage:
            return [{**end, "usage": self.usage(usage)}]
        return [end, {**self.head(end["object"]), "choices": [], "usage": self.usage(usage)}]


# ---------------------------------------------------------------- running it


class _Uvicorn(uvicorn.Server):
    """uvicorn, whose first Ctrl-C / SIGTERM also ends the streams in flight (else it would wait for them)."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher):
        super().__init__(config)
        self.batcher = batcher

    def handle_exit(self, sig, frame) -> None:
        self.batcher.close(wait=False)
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MambaCliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def serve(model, name: str, sock: socket.socket, limits: Limits, api_key: str | None = None) -> None:
    """Serve `model` on a bound socket until Ctrl-C / SIGTERM (then in-flight streams end, the socket closes)."""
    server = Server(model, name, limits, api_key)
    # The batcher runs here rather than in the app's lifespan (which other ASGI servers use): uvicorn
    # re-raises Ctrl-C after its shutdown, and a lifespan task still waiting then logs a traceback.
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=5, lifespan="off",
                            access_log=False)
    server.batcher.start()
    try:
        _Uvicorn(config, server.batcher).run(sockets=[sock])
    finally:
        server.batcher.close()
        sock.close()
