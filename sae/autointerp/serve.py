"""A small OpenAI-compatible server over the hf_local backend (FastAPI + uvicorn).

It serves `/v1/chat/completions` and, unless started chat-only, `/v1/completions` with `echo` and `logprobs`
shaped as vLLM shapes them, so the `openai` backend can be tested against a real HTTP endpoint on 127.0.0.1
and a local model can be shared by several studies. Limits: one request at a time; chat log-probs cover the
first generated token only; a completion's log-probs are computed on prompt + continuation re-tokenised.

    python -m sae.autointerp.serve --model ../shared/fixtures/smollm2-135m-instruct --port 8011
"""

import argparse
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from sae.autointerp.backends.base import ChatRequest, LogprobRequest
from sae.autointerp.backends.hf_local import HFLocalBackend
from sae.errors import exit_on_config_error


def _error(status: int, message: str, kind: str):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def create_app(backend: HFLocalBackend, served_name: str | None = None, completions: bool = True):
    """The FastAPI app; `completions=False` makes a chat-only endpoint (like a hosted chat API).

    (No postponed annotations in this module: FastAPI reads `Request` from the handlers' signatures.)
    """
    from fastapi import FastAPI, Request

    app = FastAPI()
    name = served_name or backend.model
    lock = threading.Lock()

    def wrong_model(body: dict):
        if body.get("model") != name:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        return None

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "sae"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if (err := wrong_model(body)) is not None:
            return err
        top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        messages = [(m["role"], m["content"]) for m in body["messages"]]
        prefix = ""
        if body.get("continue_final_message") and messages and messages[-1][0] == "assistant":
            prefix = messages.pop()[1]  # as vLLM: the reply continues this partial assistant message
        req = ChatRequest(tuple(messages), int(body.get("max_completion_tokens") or body.get("max_tokens") or 16),
                          float(body.get("temperature") or 0.0), top_logprobs=top, prefix=prefix)
        with lock:
            (resp,) = backend.chat([req])
        text = resp.text[len(prefix):]  # the continuation only, as vLLM returns it
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}
        if body.get("logprobs"):
            table = resp.first_logprobs or {}
            ranked = sorted(table.items(), key=lambda kv: -kv[1])
            content = []
            if ranked:
                content.append({"token": ranked[0][0], "logprob": ranked[0][1], "bytes": list(ranked[0][0].encode()),
                                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                                 for t, v in ranked[:top]]})
            choice["logprobs"] = {"content": content}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    if completions:
        @app.post("/v1/completions")
        async def complete(request: Request):
            body = await request.json()
            if (err := wrong_model(body)) is not None:
                return err
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            max_tokens, top = int(body.get("max_tokens", 16) or 0), body.get("logprobs")
            with lock:
                gens = backend.complete(prompts, max_tokens) if max_tokens > 0 else [""] * len(prompts)
                choices = [_completion_choice(backend, i, p, g, bool(body.get("echo")), top)
                           for i, (p, g) in enumerate(zip(prompts, gens))]
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": name, "choices": choices}

    return app


def _completion_choice(backend: HFLocalBackend, index: int, prompt: str, gen: str, echo: bool, top: int | None) -> dict:
    text = prompt + gen
    choice: dict[str, Any] = {
        "index": index,
        "text": text if echo else gen,
        "finish_reason": "length",
        "logprobs": None,
    }
    if top is not None:
        _, offsets = backend._encode_with_offsets(text)
        (lp,) = backend.prompt_logprobs([LogprobRequest(text, tuple(offsets), int(top))])
        keep = [i for i, off in enumerate(lp.offsets) if echo or off >= len(prompt)]
        choice["logprobs"] = {"tokens": [lp.tokens[i] for i in keep],
                              "token_logprobs": [lp.token_logprobs[i] for i in keep],
                              "top_logprobs": [lp.top[i] for i in keep],
                              "text_offset": [lp.offsets[i] for i in keep]}
    return choice


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread; yields its base URL (…/v1) and stops it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@exit_on_config_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="hub id, model directory, or .gguf file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--chat-only", action="store_true", help="serve no /v1/completions")
    args = parser.parse_args()
    import uvicorn

    backend = HFLocalBackend.load(args.model)
    uvicorn.run(create_app(backend, completions=not args.chat_only), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
