"""A fake ``tensorrt_llm``, shaped like the documented LLM API the trtllm engine uses, so its mapping
is tested on CPU. It generates nothing: each request streams a scripted token sequence.

Shapes copied from the documented API (see ``engines/trtllm.py``): ``tensorrt_llm.__version__``;
``tensorrt_llm.llmapi`` with ``LLM``, ``SamplingParams`` (keyword-only, ``max_tokens`` default 32),
``BuildConfig``, ``KvCacheConfig``, ``RequestError``; ``tensorrt_llm._tensorrt_engine.LLM``.
``LLM(model=<HF dir>, build_config=...)`` "builds" (recorded in :attr:`FakeState.builds`);
``LLM(model=<saved engine dir>)`` loads it. ``generate_async(ids, sampling_params, streaming=True)``
returns a :class:`FakeRequestOutput`: async-iterable, yielding itself after each step with
``outputs[0].token_ids`` growing (cumulative) and ``finished`` / ``outputs[0].finish_reason``
(``stop`` at ``end_id`` or when the script ends, ``length`` at ``max_tokens``, ``cancelled`` after
``abort()``), as ``tensorrt_llm/executor/result.py`` does.

Scripting: :attr:`FakeState.tokens` is the sequence every request streams (or
``FakeState.script(prompt_ids) -> tokens``); ``tokens_per_step``, ``step_delay_s`` and
``first_delay_s`` shape the stream; ``fail_request(step, match)`` makes matching requests raise
``RequestError`` at that step; ``kill(exc)`` makes the executor fail (every request's next step
raises ``exc`` and later ``generate_async`` calls raise, as after the executor shut down).
"""

from __future__ import annotations

import asyncio
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "1.0.0-fake"


class RequestError(RuntimeError):
    """``tensorrt_llm.executor.utils.RequestError``: one request failed."""


@dataclass(kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad_token_ids: list[int] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    ignore_eos: bool = False
    detokenize: bool = True


@dataclass(kw_only=True)
class BuildConfig:
    max_batch_size: int = 2048
    max_seq_len: int | None = None
    max_num_tokens: int = 8192
    max_beam_width: int = 1


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    free_gpu_memory_fraction: float | None = 0.9


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class FakeState:
    """What the tests script and inspect."""

    tokens: list[int] = field(default_factory=list)
    script: object = None  # callable(prompt_ids) -> tokens, overrides ``tokens``
    tokens_per_step: int = 1
    step_delay_s: float = 0.0
    first_delay_s: float = 0.0
    failures: list[tuple[int, object]] = field(default_factory=list)
    builds: list[dict] = field(default_factory=list)
    instances: list[FakeLLM] = field(default_factory=list)
    requests: list[FakeRequestOutput] = field(default_factory=list)
    dead: BaseException | None = None

    def fail_request(self, step: int, match=lambda prompt_ids: True) -> None:
        self.failures.append((step, match))

    def kill(self, exc: BaseException | None = None) -> None:
        self.dead = exc or RuntimeError("executor worker died (fake)")


STATE = FakeState()


class FakeRequestOutput:
    """``RequestOutput`` in streaming mode."""

    def __init__(self, llm: FakeLLM, request_id: int, prompt_token_ids: list[int], params: SamplingParams,
                 script: list[int]):
        self.llm = llm
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = params
        self.script = list(script)
        self.outputs = [CompletionOutput(0)]
        self.finished = False
        self.abort_calls = 0
        self.steps = 0
        self.position = 0  # next script token
        self.fail_at = next((step for step, match in STATE.failures if match(prompt_token_ids)), None)

    def abort(self) -> None:
        self.abort_calls += 1

    def aborted(self) -> bool:
        return self.abort_calls > 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(STATE.first_delay_s if self.steps == 0 else STATE.step_delay_s)
        if STATE.dead is not None:
            raise STATE.dead
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RequestError(f"request {self.request_id} failed (fake)")
        out = self.outputs[0]
        if self.abort_calls:
            self.finished, out.finish_reason = True, "cancelled"
            return self
        params = self.sampling_params
        banned = set(params.bad_token_ids or ())
        for _ in range(STATE.tokens_per_step):
            while self.position < len(self.script) and self.script[self.position] in banned:
                self.position += 1  # bad_token_ids: never generated
            if self.position >= len(self.script):
                self.finished, out.finish_reason = True, "stop"
                break
            token = self.script[self.position]
            self.position += 1
            if token == params.end_id and not params.ignore_eos:  # the end token is not returned
                self.finished, out.finish_reason = True, "stop"
                break
            out.token_ids.append(token)
            if len(out.token_ids) >= params.max_tokens:
                self.finished, out.finish_reason = True, "length"
                break
        return self


class FakeLLM:
    """``tensorrt_llm._tensorrt_engine.LLM`` (the TensorRT-engine LLM)."""

    def __init__(self, model, tokenizer=None, skip_tokenizer_init: bool = False, dtype: str = "auto",
                 build_config: BuildConfig | None = None, kv_cache_config: KvCacheConfig | None = None, **kwargs):
        self.model = str(model)
        self.kwargs = dict(tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init, dtype=dtype,
                           build_config=build_config, kv_cache_config=kv_cache_config, **kwargs)
        self.loaded_engine = (Path(model) / "rank0.engine").exists()
        if not self.loaded_engine:  # an HF checkpoint: the engine is built now
            if not (Path(model) / "config.json").exists():
                raise ValueError(f"no model at {model}")
            STATE.builds.append({"model": self.model, "dtype": dtype, "build_config": build_config})
        self.is_shutdown = False
        self.next_id = 0
        STATE.instances.append(self)

    def generate_async(self, inputs, sampling_params: SamplingParams | None = None, streaming: bool = False,
                       **kwargs) -> FakeRequestOutput:
        if STATE.dead is not None or self.is_shutdown:
            raise RuntimeError("executor is shut down (fake)")
        if not isinstance(inputs, list) or not all(isinstance(t, int) for t in inputs):
            raise TypeError("the fake takes prompt token ids only")
        params = sampling_params or SamplingParams()
        if params.end_id is None:
            raise ValueError("tokenizer is required to reset end_id if it is None")
        self.next_id += 1
        script = STATE.script(inputs) if STATE.script else STATE.tokens
        request = FakeRequestOutput(self, self.next_id, inputs, params, script)
        request.streaming = streaming
        STATE.requests.append(request)
        return request

    def save(self, engine_dir: str) -> None:
        path = Path(engine_dir)
        path.mkdir(parents=True, exist_ok=True)
        build = self.kwargs["build_config"]
        (path / "config.json").write_text(json.dumps({"version": VERSION, "build_config": vars(build) if build else {},
                                                       "pretrained_config": {"dtype": self.kwargs["dtype"]}}))
        (path / "rank0.engine").write_bytes(b"fake engine")

    def shutdown(self) -> None:
        self.is_shutdown = True


def install(monkeypatch, with_tensorrt_engine_module: bool = True) -> FakeState:
    """Put the fake into ``sys.modules`` (undone by ``monkeypatch``) and return a fresh state."""
    global STATE
    STATE = FakeState()
    root = types.ModuleType("tensorrt_llm")
    root.__version__ = VERSION
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    for name, value in dict(LLM=FakeLLM, SamplingParams=SamplingParams, BuildConfig=BuildConfig,
                            KvCacheConfig=KvCacheConfig, RequestError=RequestError).items():
        setattr(llmapi, name, value)
        setattr(root, name, value)
    root.llmapi = llmapi
    monkeypatch.setitem(sys.modules, "tensorrt_llm", root)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    if with_tensorrt_engine_module:
        engine_module = types.ModuleType("tensorrt_llm._tensorrt_engine")
        engine_module.LLM = FakeLLM
        root._tensorrt_engine = engine_module
        monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", engine_module)
    else:
        monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", None)  # import fails, as on 0.x
    return STATE
