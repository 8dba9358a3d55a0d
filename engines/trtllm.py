"""TensorRT-LLM backend (``engine: trtllm``): a TensorRT engine built once into the artifact, served
through TensorRT-LLM's ``LLM`` API behind the same :class:`~engines.protocol.Engine` contract as the
torch engine.

**Status: written against the documented TensorRT-LLM LLM API; it has not yet run on TensorRT-LLM.**
TensorRT-LLM cannot be installed on the machines this project was developed on; the adapter is tested
on CPU through a fake ``tensorrt_llm`` module shaped like the documented API
(``tests/engines/fake_tensorrt_llm.py``). Where ``tensorrt_llm`` is not importable, choosing
``engine: trtllm`` fails at start with :class:`UnsupportedEngineError`; it never falls back.

How this works. ``python -m engines.build --engine trtllm`` builds the engine once from the
artifact's Hugging Face-format weights with ``LLM(model=<artifact>, dtype=..., build_config=
BuildConfig(max_batch_size, max_seq_len, max_num_tokens))``, saves it with ``llm.save(<artifact>/trtllm)``
and records ``manifest["trtllm"]`` (TensorRT-LLM version, build settings, build seconds, the GPU's
fingerprint from ``engines/gpu.py``). A replica loads that saved engine (``LLM(model=<artifact>/trtllm)``,
never a rebuild; a missing engine, or one built by another TensorRT-LLM version or for another GPU, is
a clear error naming the build command). Prompts are our own: the
artifact's tokenizer and :func:`~engines.chat_template.encode_chat` turn chat messages into token ids
(so message text never becomes control tokens), and the ids go to ``generate_async(ids,
sampling_params, streaming=True)``; TensorRT-LLM's own tokenizer is not loaded
(``skip_tokenizer_init=True``) and it does not detokenize (``detokenize=False``). Each streamed
``RequestOutput`` carries the tokens so far (``outputs[0].token_ids``); the new ones go through an
:class:`~engines.detokenizer.IncrementalDetokenizer`, so stop strings behave exactly as in the torch
engine (cut before the stop string, never leaked) and the TensorRT-LLM request is aborted
(``RequestOutput.abort()``) as soon as one matches or ``max_tokens`` is reached. The last delta
carries ``usage``. A consumer that stops iterating (client gone) aborts its request. A request
error from the library (``RequestError``) fails that request alone; any other exception from the
library marks the engine dead: ``check_health`` raises :class:`EngineDeadError` and Serve replaces
the replica. At most ``max_running_seqs + max_waiting_seqs`` requests are in flight (the engine is
built with ``max_batch_size = max_running_seqs``, so TensorRT-LLM queues the rest); beyond that,
:class:`EngineOverloadedError` at once, and a request that gets no first token within
``max_queue_wait_s`` is aborted with :class:`EngineOverloadedError` too.

API followed (TensorRT-LLM 1.x, TensorRT backend; the same names exist in 0.x where
``tensorrt_llm.LLM`` was that backend):

- ``tensorrt_llm._tensorrt_engine.LLM`` (1.x; falls back to ``tensorrt_llm.llmapi.LLM`` on 0.x):
  ``LLM(model, tokenizer=None, skip_tokenizer_init=False, dtype="auto", build_config=...,
  kv_cache_config=...)``, ``generate_async(inputs, sampling_params, streaming=...)``, ``save(dir)``,
  ``shutdown()``. https://nvidia.github.io/TensorRT-LLM/llm-api/reference.html,
  examples/llm-api/_tensorrt_engine/quickstart_example.py and llm_inference_customize.py
  (``BuildConfig`` + ``llm.save``), https://nvidia.github.io/TensorRT-LLM/llm-api-examples/llm_generate_async_streaming.html.
- ``tensorrt_llm.llmapi.SamplingParams`` (keyword-only): ``end_id, pad_id, max_tokens, top_k, top_p,
  temperature, seed, stop_token_ids, bad_token_ids, ignore_eos, detokenize``
  (https://nvidia.github.io/TensorRT-LLM/llm-api/reference/SamplingParams.html; current names are
  ``max_tokens`` (not ``max_new_tokens``) and ``seed`` (not ``random_seed``)). ``top_k=None`` and
  ``top_p=None`` mean the C++ runtime defaults (0: greedy), so greedy is ``top_k=1`` and sampling
  always passes ``top_p``; ``seed=None`` means seed 0 in the runtime, so an unseeded sampled request
  gets a random seed here.
- ``RequestOutput`` (``tensorrt_llm/executor/result.py``): async-iterable when streaming, ``abort()``,
  ``finished``, ``outputs[0].token_ids`` (cumulative) and ``outputs[0].finish_reason`` in
  ``stop | length | timeout | cancelled``. A per-request failure raises
  ``tensorrt_llm.llmapi.RequestError`` from the iteration; an executor failure shuts the executor
  down and raises its exception (``GenerationExecutor._handle_background_error``).
- ``tensorrt_llm.llmapi.BuildConfig(max_batch_size, max_seq_len, max_num_tokens, max_beam_width)`` and
  ``KvCacheConfig(enable_block_reuse, max_tokens, free_gpu_memory_fraction)``
  (https://nvidia.github.io/TensorRT-LLM/llm-api/reference/KvCacheConfig.html).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import random
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .artifacts import MANIFEST, eos_token_ids, load_tokenizer, resolve_model
from .chat_template import encode_chat, output_budget, request_prompt_ids
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .gpu import gpu_fingerprint, refuse_other_gpu
from .protocol import (
    MAX_SEED,
    Delta,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineStats,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    Usage,
)

logger = logging.getLogger(__name__)

ENGINE_SUBDIR = "trtllm"  # the saved TensorRT-LLM engine, inside the artifact directory
BUILD_COMMAND = "python -m engines.build --engine trtllm"
STUCK_AFTER_S = 120.0
DEFAULT_MAX_NUM_TOKENS = 8192
# TensorRT-LLM's own finish reasons (CompletionOutput.finish_reason) -> ours.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}


class UnsupportedEngineError(EngineError, RuntimeError):
    """``engine: trtllm`` cannot run here (``tensorrt_llm`` is not importable)."""


class TrtLlmEngineMissingError(EngineError, FileNotFoundError):
    """The artifact holds no usable saved TensorRT-LLM engine; it must be built first."""


@dataclass(frozen=True)
class TrtLlmApi:
    """The parts of ``tensorrt_llm`` this module uses, imported once."""

    version: str
    llm_class: type
    llm_class_name: str
    sampling_params: type
    build_config: type
    kv_cache_config: type
    request_error: type | tuple[type, ...]


def import_tensorrt_llm() -> TrtLlmApi:
    """Import ``tensorrt_llm`` (only ever called when ``engine: trtllm`` is chosen or built)."""
    try:
        trt = importlib.import_module("tensorrt_llm")
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
    except ImportError as exc:
        raise UnsupportedEngineError(
            "engine 'trtllm' needs the tensorrt_llm package and an NVIDIA GPU; it is not installed here "
            f"({exc}). Use engine 'torch' (works on CPU and GPU)."
        ) from exc
    try:  # 1.x: the TensorRT-engine LLM lives here (tensorrt_llm.LLM is the PyTorch backend)
        llm_class = importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
        llm_class_name = "tensorrt_llm._tensorrt_engine.LLM"
    except (ImportError, AttributeError):  # 0.x: tensorrt_llm.llmapi.LLM is the TensorRT backend
        llm_class = llmapi.LLM
        llm_class_name = "tensorrt_llm.llmapi.LLM"
    return TrtLlmApi(
        version=str(getattr(trt, "__version__", "unknown")),
        llm_class=llm_class,
        llm_class_name=llm_class_name,
        sampling_params=llmapi.SamplingParams,
        build_config=llmapi.BuildConfig,
        kv_cache_config=llmapi.KvCacheConfig,
        request_error=getattr(llmapi, "RequestError", ()),
    )


def create_trtllm_engine(config: EngineConfig) -> TrtLlmEngine:
    """The registry's factory: refuses at once where ``tensorrt_llm`` is not importable."""
    return TrtLlmEngine(config, import_tensorrt_llm())


# -- build (python -m engines.build --engine trtllm) ---------------------------------------------


def _read_manifest(artifact: Path) -> dict:
    path = artifact / MANIFEST
    if not path.exists():
        raise TrtLlmEngineMissingError(f"{artifact} is not an engine artifact (no {MANIFEST}); "
                                       "run: python -m engines.build")
    return json.loads(path.read_text())


def _write_manifest(artifact: Path, manifest: dict) -> None:
    tmp = artifact / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(artifact / MANIFEST)


def trtllm_build_settings(artifact: Path, dtype: str, max_batch_size: int, max_seq_len: int | None,
                          max_num_tokens: int) -> dict:
    """The build settings recorded in the manifest; ``max_seq_len`` None: the model's context length."""
    if max_seq_len is None:
        hf_config = json.loads((artifact / "config.json").read_text())
        max_seq_len = int(hf_config.get("max_position_embeddings") or 2048)
    return {"dtype": dtype, "max_batch_size": max_batch_size, "max_seq_len": max_seq_len,
            "max_num_tokens": max_num_tokens, "max_beam_width": 1}


def trtllm_engine_is_current(artifact: Path, settings: dict, version: str) -> bool:
    try:
        recorded = _read_manifest(artifact).get("trtllm") or {}
    except (TrtLlmEngineMissingError, ValueError):
        return False
    engine_dir = artifact / recorded.get("engine_dir", ENGINE_SUBDIR)
    return (recorded.get("settings") == settings and recorded.get("version") == version
            and engine_dir.is_dir() and any(engine_dir.iterdir()))


def build_trtllm_engine(artifact: Path | str, *, dtype: str = "bfloat16", max_batch_size: int = 32,
                        max_seq_len: int | None = None, max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS,
                        force: bool = False) -> dict:
    """Build the TensorRT engine from the artifact's HF-format weights, save it into
    ``<artifact>/trtllm`` and record ``manifest["trtllm"]``. Returns the manifest."""
    artifact = Path(artifact)
    api = import_tensorrt_llm()
    manifest = _read_manifest(artifact)
    settings = trtllm_build_settings(artifact, dtype, max_batch_size, max_seq_len, max_num_tokens)
    if not force and trtllm_engine_is_current(artifact, settings, api.version):
        return manifest
    build_config = api.build_config(max_batch_size=settings["max_batch_size"], max_seq_len=settings["max_seq_len"],
                                    max_num_tokens=settings["max_num_tokens"],
                                    max_beam_width=settings["max_beam_width"])
    started = time.perf_counter()
    llm = api.llm_class(model=str(artifact), dtype=dtype, build_config=build_config)
    try:
        staging = artifact / (ENGINE_SUBDIR + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        llm.save(str(staging))
    finally:
        llm.shutdown()
    build_s = time.perf_counter() - started
    engine_dir = artifact / ENGINE_SUBDIR
    shutil.rmtree(engine_dir, ignore_errors=True)
    staging.rename(engine_dir)  # a half-saved engine is never taken as the engine
    manifest["trtllm"] = {
        "engine_dir": ENGINE_SUBDIR,
        "version": api.version,
        "llm_class": api.llm_class_name,
        "settings": settings,
        "build_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(build_s, 2),
        "gpu": _present_gpu(),  # a TensorRT engine runs only on the GPU type it was built for
    }
    _write_manifest(artifact, manifest)
    return manifest


def saved_engine_dir(model: str, version: str) -> tuple[Path, dict, dict]:
    """The saved engine of the artifact ``model``: (engine dir, manifest["trtllm"], manifest)."""
    target = resolve_model(model)
    if target.manifest is None or target.gguf_file is not None:
        raise TrtLlmEngineMissingError(
            f"engine 'trtllm' serves an engine artifact directory; {model!r} is not one. "
            f"Build one: python -m engines.build --out <dir> && {BUILD_COMMAND} --out <dir>")
    recorded = target.manifest.get("trtllm")
    engine_dir = Path(target.path) / (recorded or {}).get("engine_dir", ENGINE_SUBDIR)
    if not recorded or not engine_dir.is_dir() or not any(engine_dir.iterdir()):
        raise TrtLlmEngineMissingError(
            f"no saved TensorRT-LLM engine in {target.path} (expected {engine_dir}, recorded in {MANIFEST} "
            f"under 'trtllm'); replicas never build one. Build it once: {BUILD_COMMAND} --out {target.path}")
    if recorded.get("version") != version:
        raise TrtLlmEngineMissingError(
            f"the engine in {engine_dir} was built with tensorrt_llm {recorded.get('version')}, this is "
            f"{version}; TensorRT engines are not portable across versions. Rebuild: "
            f"{BUILD_COMMAND} --force --out {target.path}")
    built_for, present = recorded.get("gpu"), _present_gpu()
    if built_for and present:  # a TensorRT engine is built for one GPU type
        refuse_other_gpu(built_for, present, f"the engine in {engine_dir} was built",
                         f"{BUILD_COMMAND} --force --out {target.path}")
    return engine_dir, recorded, target.manifest


def _present_gpu() -> dict | None:
    """This machine's GPU fingerprint (``engines/gpu.py``), or None where torch sees no CUDA device."""
    import torch

    return gpu_fingerprint() if torch.cuda.is_available() else None


# -- serving ------------------------------------------------------------------------------------


class TrtLlmEngine:
    """See the module docstring. Construct with an :class:`EngineConfig` (and the imported API),
    then :meth:`start`. All methods run on the replica's event loop."""

    def __init__(self, config: EngineConfig, api: TrtLlmApi):
        self.config = config
        self.api = api
        self.llm = None
        self.tokenizer = None
        self._streams: dict[str, _RequestStream] = {}
        self._dead: BaseException | None = None
        self._last_progress_s = time.monotonic()
        self.counters = dict(steps=0, tokens_generated=0, requests_finished=0, requests_aborted=0)
        self.load_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        started = time.perf_counter()
        engine_dir, recorded, _ = saved_engine_dir(self.config.model, self.api.version)
        self.engine_dir = engine_dir
        self.tokenizer = load_tokenizer(self.config.model)
        self.max_seq_len = self.config.resolve_max_seq_len(recorded["settings"]["max_seq_len"])
        if self.config.max_running_seqs > recorded["settings"]["max_batch_size"]:
            logger.warning("max_running_seqs=%d exceeds the engine's max_batch_size=%d: TensorRT-LLM queues the "
                           "excess and stats() counts it as running; rebuild with --max-batch-size",
                           self.config.max_running_seqs, recorded["settings"]["max_batch_size"])
        from transformers import AutoConfig

        model_dir = resolve_model(self.config.model).path
        self.eos_ids = eos_token_ids(model_dir, self.tokenizer, AutoConfig.from_pretrained(model_dir))
        self.end_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else min(self.eos_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        vocab = len(self.tokenizer)
        self.banned_if_ignore_eos = sorted(i for i in self.eos_ids | set(self.tokenizer.all_special_ids)
                                           if 0 <= i < vocab)
        kv_kwargs = dict(enable_block_reuse=self.config.prefix_cache_tokens > 0,
                         max_tokens=self.config.kv_budget_tokens)
        kv_kwargs["free_gpu_memory_fraction"] = self.config.gpu_memory_fraction
        # Loading a saved engine directory: no build (the build settings are the engine's own).
        self.llm = self.api.llm_class(model=str(engine_dir), skip_tokenizer_init=True,
                                      kv_cache_config=self.api.kv_cache_config(**kv_kwargs))
        self.load_seconds = time.perf_counter() - started
        self._last_progress_s = time.monotonic()
        logger.info("trtllm engine started: %s (tensorrt_llm %s) max_seq_len=%d load=%.2fs", engine_dir,
                    self.api.version, self.max_seq_len, self.load_seconds)

    def shutdown(self) -> None:
        for stream in list(self._streams.values()):
            stream.abort()
        if self.llm is not None:
            try:
                self.llm.shutdown()
            except Exception:  # noqa: BLE001 - shutting down a dead executor may fail again
                logger.exception("tensorrt_llm shutdown failed")
            self.llm = None

    # -- requests -------------------------------------------------------------------------------
    def prompt_ids_for(self, request: GenerationRequest) -> list[int]:
        return request_prompt_ids(request, self.tokenizer, len(self.tokenizer))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The prompt ids of chat messages; their text never becomes control tokens (``chat_template.py``)."""
        return encode_chat(self.tokenizer, messages)

    def _limits(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Prompt ids and max_tokens, checked against ``max_seq_len`` as the torch engine does."""
        prompt_ids = self.prompt_ids_for(request)
        return prompt_ids, output_budget(len(prompt_ids), request.sampling.max_tokens, self.max_seq_len,
                                         self.config.default_max_tokens)

    def sampling_params_for(self, sampling: SamplingParams, max_tokens: int):
        """Our sampling parameters as ``tensorrt_llm.llmapi.SamplingParams``. Stop strings are not
        passed: our detokenizer applies them (same semantics as the torch engine)."""
        kwargs: dict = dict(max_tokens=max_tokens, end_id=self.end_id, pad_id=self.pad_id, n=1, detokenize=False)
        if sampling.greedy:
            kwargs.update(top_k=1)  # top_k None would mean the runtime default, not "all tokens"
        else:
            seed = sampling.seed if sampling.seed is not None else random.randint(0, MAX_SEED)
            kwargs.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p), seed=seed)
        if sampling.ignore_eos:
            # As the torch engine: never pick EOS nor another special token, text until max_tokens.
            kwargs.update(ignore_eos=True, bad_token_ids=list(self.banned_if_ignore_eos))
        elif len(self.eos_ids) > 1:
            kwargs.update(stop_token_ids=sorted(self.eos_ids - {self.end_id}))
        return self.api.sampling_params(**kwargs)

    def submit(self, requests: list[GenerationRequest]) -> list[AsyncIterator[Delta] | EngineError]:
        """Per request, its delta stream (to be iterated or closed) or the error that rejected it."""
        results: list[AsyncIterator[Delta] | EngineError] = []
        for request in requests:
            try:
                results.append(self._submit_one(request))
            except EngineError as exc:
                results.append(exc)
            except Exception as exc:  # noqa: BLE001 - one request's failure is its own, never its batch's
                results.append(EngineError(f"request refused: {exc!r}"))
        return results

    def _submit_one(self, request: GenerationRequest) -> _RequestStream:
        self._check_alive()
        bound = self.config.max_running_seqs + self.config.max_waiting_seqs
        if len(self._streams) >= bound:
            raise EngineOverloadedError(f"waiting queue is full ({self.config.max_waiting_seqs} requests)")
        if request.request_id in self._streams:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running", "request_id")
        prompt_ids, max_tokens = self._limits(request)
        params = self.sampling_params_for(request.sampling, max_tokens)
        try:
            output = self.llm.generate_async(prompt_ids, sampling_params=params, streaming=True)
        except self.api.request_error as exc:
            raise EngineError(f"request refused by tensorrt_llm: {exc}") from exc
        except (ValueError, TypeError) as exc:  # the LLM API's own argument checks
            raise EngineError(f"request refused by tensorrt_llm: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - anything else: the executor itself is gone
            self._mark_dead(exc)
            raise EngineDeadError(f"tensorrt_llm executor failed: {exc!r}") from exc
        stream = _RequestStream(self, request, prompt_ids, max_tokens, output)
        if not self._streams:  # the stall clock starts with the first request in flight, not at the last output
            self._last_progress_s = time.monotonic()
        self._streams[request.request_id] = stream
        return stream

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        (result,) = self.submit([request])
        if isinstance(result, EngineError):
            raise result
        try:
            async for delta in result:
                yield delta
        finally:
            await result.aclose()

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.abort()

    # -- health and stats -------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self.llm is None:
            raise EngineDeadError("trtllm engine is not running (not started or shut down)")
        if self._dead is not None:
            raise EngineDeadError(f"tensorrt_llm executor failed: {self._dead!r}")

    def _mark_dead(self, exc: BaseException) -> None:
        if self._dead is None:
            logger.error("tensorrt_llm executor failed; the engine is dead: %r", exc)
            self._dead = exc

    def check_health(self) -> None:
        self._check_alive()
        stalled_s = time.monotonic() - self._last_progress_s
        if self._streams and stalled_s > STUCK_AFTER_S:
            raise EngineDeadError(f"tensorrt_llm produced no output for {stalled_s:.0f}s while busy")

    def stats(self) -> EngineStats:
        """Counted here, per request (TensorRT-LLM's own iteration stats are not read): ``running``
        is in-flight requests up to ``max_running_seqs`` (the engine's max_batch_size), the rest
        ``waiting``. TensorRT-LLM owns the KV cache, so its gauges are 0."""
        in_flight = len(self._streams)
        running = min(in_flight, self.config.max_running_seqs)
        return EngineStats(
            running=running, waiting=in_flight - running, max_running=self.config.max_running_seqs,
            kv_budget_tokens=self.config.kv_budget_tokens, kv_allocated_tokens=0, kv_bytes=0,
            steps=self.counters["steps"], tokens_generated=self.counters["tokens_generated"],
            requests_finished=self.counters["requests_finished"], requests_aborted=self.counters["requests_aborted"],
            last_batch_size=running, loop_alive=self.llm is not None and self._dead is None,
            seconds_since_last_step=time.monotonic() - self._last_progress_s,
        )


class _RequestStream:
    """One request's deltas from its ``RequestOutput``. An async iterator with ``aclose``, like the
    torch engine's streams; closing it (or the engine's ``abort``) before the end aborts the
    request in TensorRT-LLM. ``released``: no longer counted in flight; ``ended``: nothing more to
    hand out."""

    def __init__(self, engine: TrtLlmEngine, request: GenerationRequest, prompt_ids: list[int], max_tokens: int,
                 output):
        self.engine = engine
        self.request_id = request.request_id
        self.sampling = request.sampling
        self.prompt_len = len(prompt_ids)
        self.max_tokens = max_tokens
        self.output = output
        self.detokenizer = IncrementalDetokenizer(engine.tokenizer, request.sampling.stop)
        self.output_ids: list[int] = []
        self.unsent: list[int] = []
        self.seen = 0  # tokens of outputs[0].token_ids already read
        self.first = True
        self.library_ended = False
        self.released = False
        self.ended = False

    def __aiter__(self) -> _RequestStream:
        return self

    async def __anext__(self) -> Delta:
        while True:
            if self.ended:
                raise StopAsyncIteration
            if self.released:  # aborted (engine.abort, shutdown) while nobody was reading
                return self._final("abort", "")
            if self.engine._dead is not None:
                self._fail(aborted=True)
                raise EngineDeadError(f"tensorrt_llm executor failed: {self.engine._dead!r}")
            result = await self._next_output()
            delta = self._consume(result)
            if delta is not None:
                return delta

    async def _next_output(self):
        """The next ``RequestOutput`` update, with the library's failures mapped to ours."""
        engine = self.engine
        try:
            if self.first:  # no first output within the queue time bound: overloaded, as in the torch engine
                self.first = False
                try:
                    return await asyncio.wait_for(self.output.__anext__(), engine.config.max_queue_wait_s)
                except TimeoutError:
                    self._abort_library()
                    self._fail(aborted=True)
                    raise EngineOverloadedError(
                        f"no room for {engine.config.max_queue_wait_s:g} s: every row was busy") from None
            return await self.output.__anext__()
        except StopAsyncIteration:
            self.library_ended = True
            return self.output  # the library is done: read its final state
        except engine.api.request_error as exc:  # this request failed, the engine goes on
            self._fail(aborted=False)
            raise EngineError(f"generation failed: {exc}") from exc
        except (EngineError, asyncio.CancelledError, GeneratorExit):
            self._close_quietly()
            raise
        except Exception as exc:  # noqa: BLE001 - not a request error: the executor failed
            engine._mark_dead(exc)
            self._fail(aborted=True)
            raise EngineDeadError(f"tensorrt_llm executor failed: {exc!r}") from exc

    def _consume(self, result) -> Delta | None:
        """Turn one ``RequestOutput`` update into a delta (None: nothing to show yet)."""
        engine = self.engine
        engine.counters["steps"] += 1
        engine._last_progress_s = time.monotonic()
        out = result.outputs[0]
        token_ids = list(out.token_ids or ())
        new, self.seen = token_ids[self.seen:], len(token_ids)
        library_done = bool(result.finished) or self.library_ended
        text = ""
        for token in new:
            self.output_ids.append(token)
            self.unsent.append(token)
            engine.counters["tokens_generated"] += 1
            if token in engine.eos_ids and not self.sampling.ignore_eos:
                return self._finish("stop", text, library_done)
            text += self.detokenizer.add_token(token)
            if self.detokenizer.stopped:
                return self._finish("stop", text, library_done)
            if len(self.output_ids) >= self.max_tokens:
                return self._finish("length", text, library_done)
        if library_done or out.finish_reason is not None:
            return self._finish(FINISH_REASONS.get(out.finish_reason, "stop"), text, library_done=True)
        if text:
            return Delta(self.request_id, text, self._take_unsent())
        return None

    def _finish(self, reason: str, text: str, library_done: bool) -> Delta:
        if not library_done:
            self._abort_library()  # our stop string / EOS / max_tokens ended it first
        if reason in ("stop", "length"):
            text += self.detokenizer.finish()
        return self._final(reason, text)

    def _final(self, reason: str, text: str) -> Delta:
        self._release(aborted=reason == "abort")
        self.ended = True
        return Delta(self.request_id, text, self._take_unsent(), finish_reason=reason,
                     usage=Usage(self.prompt_len, len(self.output_ids)))

    def _take_unsent(self) -> tuple[int, ...]:
        ids, self.unsent = tuple(self.unsent), []
        return ids

    def _abort_library(self) -> None:
        try:
            self.output.abort()
        except Exception:  # noqa: BLE001 - the request may be finished or the executor gone
            logger.debug("abort of request %s failed", self.request_id, exc_info=True)

    def _release(self, aborted: bool) -> None:
        if self.released:
            return
        self.released = True
        self.engine._streams.pop(self.request_id, None)
        self.engine.counters["requests_aborted" if aborted else "requests_finished"] += 1

    def _fail(self, aborted: bool) -> None:
        self._release(aborted)
        self.ended = True

    def _close_quietly(self) -> None:
        if not self.ended:
            if not self.released:
                self._abort_library()
            self._fail(aborted=True)

    def abort(self) -> None:
        """Stop the request in TensorRT-LLM and free its place at once; a reader gets a last delta
        with ``finish_reason="abort"``."""
        if not self.released:
            self._abort_library()
            self._release(aborted=True)

    async def aclose(self) -> None:
        """The consumer stopped: abort the request if it has not finished."""
        self._close_quietly()
