"""A small, real OpenAI-compatible HTTP server that misbehaves on demand, for router tests and benchmarks.

The upstream model name picks the behaviour:

| model            | behaviour                                                                  |
|------------------|----------------------------------------------------------------------------|
| `echo`           | well-behaved and fast: streams `max_tokens` tokens ("tok0 tok1 ...")         |
| `slow`           | well-behaved, 100 ms per token                                              |
| `rate-limited-N` | 429 with `Retry-After: N`                                                   |
| `error-500`      | 500                                                                         |
| `bad-request`    | 400 with an OpenAI error                                                    |
| `hang`           | never answers (until the client times out)                                  |
| `drop`           | streams two tokens (or half a JSON body), then drops the connection         |
| `switch`         | 503 while `POST /control {"failing": true}` is in force, else like `echo`  |
| `tools`          | calls `get_weather` (streamed as tool-call deltas); every chunk carries an  |
|                  | extra field `upstream_extra` echoing the request's `x_custom`               |
| `malformed`      | 200 with `choices: [null]`, or a stream event that is not JSON              |
| `late-S`         | like `echo`, but its answer (or first byte) comes after S seconds          |

`GET /last` returns the last request body as received; `POST /v1/embeddings` answers 4-dim vectors.

    python -m tests.upstream --port 9000      # run one by hand
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from collections import Counter

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def build_upstream(name: str) -> FastAPI:
    app = FastAPI()
    app.state.failing = False
    app.state.calls = Counter()
    app.state.last_body = None
    app.state.client_ports = Counter()  # requests per client TCP port: one port means one pooled connection

    @app.get("/last")
    async def last() -> dict:
        return app.state.last_body or {}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        body = await request.json()
        app.state.last_body = body
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [0.5, 0.5, 0.5, 0.5]} for i in range(len(inputs))]
        return {"object": "list", "data": data, "model": body.get("model"),
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}

    @app.post("/control")
    async def control(request: Request) -> dict:
        app.state.failing = bool((await request.json()).get("failing"))
        return {"failing": app.state.failing}

    @app.get("/stats")
    async def stats() -> dict:
        return dict(app.state.calls)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": name}]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        app.state.last_body = body
        model = str(body.get("model", "echo"))
        app.state.calls[model] += 1
        app.state.client_ports[request.client.port] += 1
        if model == "malformed":
            if body.get("stream"):
                return StreamingResponse(_malformed_stream(), media_type="text/event-stream")
            return {"id": "up-bad", "object": "chat.completion", "model": model, "choices": [None]}
        if model == "tools" and chat:
            extra = {"echo": body.get("x_custom")}
            if body.get("stream"):
                return StreamingResponse(_tool_stream(name, extra), media_type="text/event-stream")
            call = {"id": "call_up", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            return {"id": "up-tools", "object": "chat.completion", "created": int(time.time()), "model": model,
                    "upstream_extra": extra,
                    "choices": [{"index": 0, "finish_reason": "tool_calls",
                                 "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        if model.startswith("rate-limited"):
            wait = model.rsplit("-", 1)[-1]
            return _error(429, "Rate limited by upstream.", headers={"Retry-After": wait if wait.isdigit() else "1"})
        if model == "error-500" or (model == "switch" and app.state.failing):
            return _error(500 if model == "error-500" else 503, "Upstream failure.")
        if model == "bad-request":
            return _error(400, "Upstream says: this request is invalid.")
        if model == "hang":
            await asyncio.sleep(3600)
        if model.startswith("late-"):  # late-<seconds>: the answer (or the stream's first byte) comes that late
            await asyncio.sleep(float(model.split("-", 1)[1]))
        count = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        delay = 0.1 if model == "slow" else 0.0
        prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(name, model, chat, count, delay, prompt_tokens, usage),
                                     media_type="text/event-stream")
        if model == "drop":  # half a JSON body, then the connection goes
            return StreamingResponse(_dropped_body(), media_type="application/json")
        await asyncio.sleep(delay * count)
        text = "".join(f"tok{i} " for i in range(count))
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                  if chat else {"index": 0, "text": text, "finish_reason": "length"})
        return {"id": f"up-{time.time_ns()}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                          "total_tokens": prompt_tokens + count}}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _stream(name: str, model: str, chat: bool, count: int, delay: float, prompt_tokens: int, usage: bool):
    created = int(time.time())
    for i in range(count):
        if model == "drop" and i == 2:
            raise ConnectionResetError("dropping the connection on purpose")
        if delay:
            await asyncio.sleep(delay)
        finish = "length" if i == count - 1 else None
        choice = ({"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": finish} if chat
                  else {"index": 0, "text": f"tok{i} ", "finish_reason": finish})
        event = {"id": f"up-{name}", "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": created, "model": model, "choices": [choice]}
        yield f"data: {json.dumps(event)}\n\n"
    if usage:
        event = {"id": f"up-{name}", "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                                          "total_tokens": prompt_tokens + count}}
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


async def _tool_stream(name: str, extra: dict):
    created = int(time.time())
    deltas = [{"role": "assistant", "content": None,
               "tool_calls": [{"index": 0, "id": "call_up", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}]
    for i, delta in enumerate(deltas):
        finish = "tool_calls" if i == len(deltas) - 1 else None
        event = {"id": f"up-{name}", "object": "chat.completion.chunk", "created": created, "model": "tools",
                 "upstream_extra": extra, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        yield f"data: {json.dumps(event)}\n\n"
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    yield f"data: {json.dumps({'id': f'up-{name}', 'object': 'chat.completion.chunk', 'created': created, 'model': 'tools', 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


async def _dropped_body():
    yield '{"id": "up-drop", "object": "chat.completion", "choices": [{"index": 0, '
    raise ConnectionResetError("dropping the connection on purpose")


async def _malformed_stream():
    yield "data: {this is not json\n\n"


class UpstreamServer:
    """Runs an upstream in a background thread on 127.0.0.1; `with UpstreamServer("a") as server: server.url`."""

    def __init__(self, name: str, port: int = 0):
        self.name = name
        self.app = build_upstream(name)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> UpstreamServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.upstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes sharing the port (a benchmark upstream that must never be the limit)")
    args = parser.parse_args(argv)
    if args.workers == 1:
        uvicorn.run(build_upstream(args.name), host="127.0.0.1", port=args.port, log_level="warning")
    else:  # uvicorn's workers import the app by name; the name of the server travels in the environment
        os.environ["TUNESERVE_UPSTREAM_NAME"] = args.name
        uvicorn.run("tests.upstream:_app_from_env", factory=True, workers=args.workers, host="127.0.0.1",
                    port=args.port, log_level="warning")


def _app_from_env() -> FastAPI:
    return build_upstream(os.environ.get("TUNESERVE_UPSTREAM_NAME", "upstream"))


if __name__ == "__main__":
    main()
