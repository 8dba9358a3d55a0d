"""The design users outgrow, kept as a comparison point (not part of the product).

    python -m benchmarks baseline-server --port 8100

FastAPI + uvicorn; each request runs its own ``model.generate`` from transformers in a thread, and
``AsyncTextIteratorStreamer`` hands the text to the event loop as it is decoded. No batching across
requests: concurrent requests run concurrent ``generate`` calls that share the CPU. Same model
artifact and chat template as chatserve, OpenAI-compatible ``/v1/chat/completions`` (streaming with
``usage``, and ``ignore_eos``), ``/v1/models`` and ``/readyz``, so ``python -m benchmarks serve``
measures both the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from engines.artifacts import DEFAULT_ARTIFACT_DIR, DEFAULT_MODEL_NAME, load_model


class ChatRequest(BaseModel):
    model: str = DEFAULT_MODEL_NAME
    messages: list[dict]
    max_tokens: int = 128
    temperature: float = 0.0
    stream: bool = False
    ignore_eos: bool = False


def build_app(model_path: str, model_name: str) -> FastAPI:
    from transformers import AsyncTextIteratorStreamer

    model, tokenizer, _ = load_model(model_path)
    app = FastAPI(title="baseline: one generate per request")

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "baseline"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        prompt = tokenizer.apply_chat_template(body.messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        streamer = AsyncTextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": body.temperature} if body.temperature > 0 else {"do_sample": False}
        kwargs = {**prompt, **sampling, "max_new_tokens": body.max_tokens, "streamer": streamer,
                  "min_new_tokens": body.max_tokens if body.ignore_eos else 0}
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(out=model.generate(**kwargs)), daemon=True)
        worker.start()
        prompt_tokens = prompt["input_ids"].shape[1]

        def usage() -> dict:
            completion = result["out"].shape[1] - prompt_tokens if "out" in result else 0
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(delta: dict, finish=None, **extra) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                            "finish_reason": finish}], **extra}) + "\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for text in streamer:
                if text:
                    yield chunk({"content": text})
            worker.join()
            yield chunk({}, finish="length" if usage()["completion_tokens"] >= body.max_tokens else "stop")
            yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "choices": [],
                                         "usage": usage()}) + "\n\n"
            yield "data: [DONE]\n\n"

        if body.stream:
            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join([t async for t in streamer])
        worker.join()
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}], "usage": usage()})

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m benchmarks baseline-server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_ARTIFACT_DIR), help="engine artifact (or HF dir / GGUF)")
    parser.add_argument("--served-model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    uvicorn.run(build_app(args.model, args.served_model_name), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
