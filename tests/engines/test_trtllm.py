"""The trtllm engine's adapter, driven through a fake ``tensorrt_llm`` shaped like the documented
LLM API (``fake_tensorrt_llm.py``): builds, loading the saved engine, request mapping, streaming,
stop strings, aborts, failures and bounds. Nothing here runs TensorRT-LLM itself."""

import asyncio
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from engines import build, trtllm
from engines.artifacts import load_tokenizer
from engines.config import EngineConfig
from engines.gpu import GpuArtifactMismatchError
from engines.protocol import (
    BatchSubmit,
    Engine,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from engines.registry import create_engine
from engines.trtllm import (
    BUILD_COMMAND,
    ENGINE_SUBDIR,
    TrtLlmEngineMissingError,
    UnsupportedEngineError,
    build_trtllm_engine,
    import_tensorrt_llm,
)

from . import fake_tensorrt_llm as fake
from .helpers import chat, collect, hang_up_after

ARTIFACT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "manifest.json")
ANSWER = "The capital of France is Paris. It is known for the Eiffel Tower and fine food."


@pytest.fixture(scope="module")
def tokenizer(artifact_dir):
    return load_tokenizer(artifact_dir)


@pytest.fixture
def trt(monkeypatch, tokenizer):
    monkeypatch.setattr(trtllm, "load_tokenizer", lambda model: tokenizer)  # one load for the module
    return fake.install(monkeypatch)


@pytest.fixture
def hf_artifact(tmp_path, artifact_dir) -> Path:
    """A copy of the default artifact without weights (the fake loads none) and without an engine."""
    out = tmp_path / "artifact"
    out.mkdir()
    for name in ARTIFACT_FILES:
        if (Path(artifact_dir) / name).exists():
            shutil.copy(Path(artifact_dir) / name, out / name)
    return out


@pytest.fixture
def trt_artifact(trt, hf_artifact) -> Path:
    build_trtllm_engine(hf_artifact, max_batch_size=4, max_seq_len=2048)
    trt.builds.clear()
    trt.instances.clear()
    return hf_artifact


def make_engine(artifact: Path, **config):
    config.setdefault("max_running_seqs", 4)
    engine = create_engine(EngineConfig(model=str(artifact), engine="trtllm", **config))
    engine.start()
    return engine


@pytest.fixture
def engine(trt_artifact):
    eng = make_engine(trt_artifact)
    yield eng
    eng.shutdown()


def ids(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


# -- not available, not built ---------------------------------------------------------------------------


def test_not_importable_is_a_clear_error(monkeypatch, artifact_dir):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(UnsupportedEngineError, match="needs the tensorrt_llm package.*Use engine 'torch'"):
        create_engine(EngineConfig(model=artifact_dir, engine="trtllm"))
    with pytest.raises(UnsupportedEngineError, match="tensorrt_llm"):
        build.main(["--engine", "trtllm", "--out", artifact_dir])


def test_a_missing_saved_engine_names_the_build_command(trt, hf_artifact):
    engine = create_engine(EngineConfig(model=str(hf_artifact), engine="trtllm"))
    with pytest.raises(TrtLlmEngineMissingError, match=f"replicas never build one.*{BUILD_COMMAND}"):
        engine.start()
    assert trt.builds == [] and trt.instances == []  # nothing built, nothing loaded


def test_an_engine_from_another_tensorrt_llm_version_is_refused(trt_artifact):
    manifest = json.loads((trt_artifact / "manifest.json").read_text())
    manifest["trtllm"]["version"] = "0.9.0"
    (trt_artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrtLlmEngineMissingError, match="not portable across versions.*--force"):
        make_engine(trt_artifact)


def test_an_engine_built_for_another_gpu_is_refused(trt, hf_artifact, monkeypatch):
    built_on = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "570.1", "cuda_runtime": "12.8",
                "torch": "2.13.0"}
    monkeypatch.setattr(trtllm, "_present_gpu", lambda: built_on)
    trtllm.build_trtllm_engine(hf_artifact)
    assert json.loads((hf_artifact / "manifest.json").read_text())["trtllm"]["gpu"] == built_on
    monkeypatch.setattr(trtllm, "_present_gpu", lambda: {**built_on, "name": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(GpuArtifactMismatchError, match="built for NVIDIA H100.*has NVIDIA L4.*compute_capability"):
        make_engine(hf_artifact)
    monkeypatch.setattr(trtllm, "_present_gpu", lambda: dict(built_on))
    make_engine(hf_artifact).shutdown()  # the same GPU: served


def test_the_1x_llm_class_is_preferred_and_0x_falls_back(trt, monkeypatch):
    assert import_tensorrt_llm().llm_class_name == "tensorrt_llm._tensorrt_engine.LLM"
    fake.install(monkeypatch, with_tensorrt_engine_module=False)
    assert import_tensorrt_llm().llm_class_name == "tensorrt_llm.llmapi.LLM"


# -- build once, load the saved engine ----------------------------------------------------------------------


def test_build_passes_the_build_config_saves_into_the_artifact_and_records_it(trt, hf_artifact, capsys):
    args = ["--engine", "trtllm", "--out", str(hf_artifact), "--max-batch-size", "8", "--max-seq-len", "1024",
            "--max-num-tokens", "2048", "--trtllm-dtype", "float16"]
    assert build.main(args) == 0
    (built,) = trt.builds
    assert built["model"] == str(hf_artifact) and built["dtype"] == "float16"
    config = built["build_config"]
    assert (config.max_batch_size, config.max_seq_len, config.max_num_tokens, config.max_beam_width) == (8, 1024,
                                                                                                         2048, 1)
    assert (hf_artifact / ENGINE_SUBDIR / "rank0.engine").exists()
    assert not (hf_artifact / (ENGINE_SUBDIR + ".partial")).exists()
    assert trt.instances[0].is_shutdown  # the building LLM is shut down
    manifest = json.loads((hf_artifact / "manifest.json").read_text())
    recorded = manifest["trtllm"]
    assert recorded["version"] == fake.VERSION and recorded["engine_dir"] == ENGINE_SUBDIR
    assert recorded["settings"] == {"dtype": "float16", "max_batch_size": 8, "max_seq_len": 1024,
                                    "max_num_tokens": 2048, "max_beam_width": 1}
    assert recorded["build_seconds"] >= 0 and recorded["llm_class"] == "tensorrt_llm._tensorrt_engine.LLM"
    assert manifest["engine"] == "torch" and manifest["source_hash"]  # the artifact's own record is kept
    # Same settings again: up to date, not rebuilt; --force rebuilds.
    assert build.main(args) == 0 and len(trt.builds) == 1
    assert build.main([*args, "--force"]) == 0 and len(trt.builds) == 2


def test_the_default_max_seq_len_is_the_models_context(trt, hf_artifact):
    manifest = build_trtllm_engine(hf_artifact)
    context = json.loads((hf_artifact / "config.json").read_text())["max_position_embeddings"]
    assert manifest["trtllm"]["settings"]["max_seq_len"] == context == trt.builds[0]["build_config"].max_seq_len


def test_a_replica_loads_the_saved_engine_without_building(trt, trt_artifact):
    engine = make_engine(trt_artifact, kv_budget_tokens=4096, prefix_cache_tokens=0)
    try:
        assert trt.builds == []
        (llm,) = trt.instances
        assert llm.loaded_engine and llm.model == str(trt_artifact / ENGINE_SUBDIR)
        assert llm.kwargs["skip_tokenizer_init"] is True and llm.kwargs["build_config"] is None
        kv = llm.kwargs["kv_cache_config"]
        assert kv.max_tokens == 4096 and kv.enable_block_reuse is False
        assert engine.max_seq_len == 2048  # the engine's built max_seq_len bounds the served one
        engine.check_health()
    finally:
        engine.shutdown()
    assert llm.is_shutdown
    with pytest.raises(EngineDeadError):
        engine.check_health()


# -- requests -------------------------------------------------------------------------------------------------


async def test_streams_deltas_with_usage_on_the_last(trt, engine):
    trt.tokens = ids(engine, ANSWER) + [engine.end_id]
    request = chat("What is the capital of France?", max_tokens=100)
    text, tokens, deltas = await collect(engine, request)
    assert text == ANSWER and tokens == ids(engine, ANSWER)
    assert len([d for d in deltas if d.text]) > 5  # streamed, not one block
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    (sent,) = trt.requests
    assert sent.streaming is True and sent.prompt_token_ids == engine.prompt_ids_for(request)
    usage = deltas[-1].usage
    assert usage.prompt_tokens == len(sent.prompt_token_ids) and usage.completion_tokens == len(tokens)
    stats = engine.stats()
    assert (stats.running, stats.requests_finished, stats.tokens_generated) == (0, 1, len(tokens))
    assert stats.loop_alive


async def test_several_tokens_per_step_are_streamed_in_order(trt, engine):
    trt.tokens, trt.tokens_per_step = ids(engine, ANSWER), 3
    text, _, deltas = await collect(engine, chat("Hi", max_tokens=100))
    assert text == ANSWER and deltas[-1].finish_reason == "stop"


def test_sampling_parameters_map_to_the_documented_fields(engine):
    greedy = engine.sampling_params_for(SamplingParams(temperature=0.0, seed=3), 17)
    assert (greedy.top_k, greedy.top_p, greedy.temperature, greedy.seed) == (1, None, None, None)
    assert greedy.max_tokens == 17 and greedy.end_id == engine.tokenizer.eos_token_id
    assert greedy.detokenize is False and greedy.stop is None and greedy.n == 1
    sampled = engine.sampling_params_for(SamplingParams(temperature=0.7, top_p=0.9, seed=5), 8)
    assert (sampled.top_k, sampled.top_p, sampled.temperature, sampled.seed) == (None, 0.9, 0.7, 5)
    full = engine.sampling_params_for(SamplingParams(temperature=1.0), 8)
    assert full.top_p == 1.0  # None would mean the runtime's default, greedy
    assert isinstance(full.seed, int)  # None would mean seed 0 for every request
    assert engine.sampling_params_for(SamplingParams(temperature=1.0), 8).seed != full.seed
    ignore = engine.sampling_params_for(SamplingParams(ignore_eos=True), 8)
    assert ignore.ignore_eos is True and engine.eos_ids <= set(ignore.bad_token_ids)
    assert set(engine.tokenizer.all_special_ids) <= set(ignore.bad_token_ids)
    assert not engine.sampling_params_for(SamplingParams(), 8).ignore_eos


async def test_max_tokens_default_and_limit(trt, engine):
    trt.tokens = ids(engine, ANSWER * 3)
    _, tokens, deltas = await collect(engine, chat("Hi", max_tokens=5))
    assert deltas[-1].finish_reason == "length" and len(tokens) == 5 == deltas[-1].usage.completion_tokens
    await collect(engine, chat("Hi"))
    prompt_len = len(trt.requests[-1].prompt_token_ids)
    assert trt.requests[-1].sampling_params.max_tokens == min(engine.config.default_max_tokens,
                                                              engine.max_seq_len - prompt_len)
    with pytest.raises(InvalidRequestError, match="exceeds the limit") as err:
        await collect(engine, chat("Hi", max_tokens=engine.max_seq_len))
    assert err.value.field == "max_tokens"
    with pytest.raises(InvalidRequestError, match="prompt is"):
        await collect(engine, chat("word " * 3000, max_tokens=1))


async def test_ignore_eos_writes_text_to_max_tokens(trt, engine):
    words = ids(engine, "One two three four five six seven eight nine ten.")
    trt.tokens = words[:3] + [engine.end_id] + words[3:]
    text, tokens, deltas = await collect(engine, chat("Count", max_tokens=8, ignore_eos=True))
    assert deltas[-1].finish_reason == "length" and len(tokens) == 8 and engine.end_id not in tokens
    assert text == engine.tokenizer.decode(words[:8])


@pytest.mark.parametrize("tokens_per_step", [1, 4])
@pytest.mark.parametrize("stop", ["Paris", "France is", "Eiffel"])
async def test_a_stop_string_ends_the_output_never_leaks_and_aborts_the_request(trt, engine, stop, tokens_per_step):
    trt.tokens, trt.tokens_per_step = ids(engine, ANSWER), tokens_per_step
    text, _, deltas = await collect(engine, chat("Hi", max_tokens=100, stop=[stop]))
    assert text == ANSWER[: ANSWER.index(stop)]
    assert all(stop not in d.text for d in deltas) and deltas[-1].finish_reason == "stop"
    (sent,) = trt.requests
    assert sent.sampling_params.stop is None  # ours, not the library's
    assert sent.abort_calls == 1 and not sent.finished  # the TensorRT-LLM request was stopped
    assert engine.stats().requests_finished == 1 and engine.stats().running == 0


async def test_a_consumer_that_stops_early_aborts_its_request(trt, engine):
    trt.tokens, trt.step_delay_s = ids(engine, ANSWER * 3), 0.001
    await hang_up_after(engine, chat("Hi", max_tokens=200))
    (sent,) = trt.requests
    assert sent.abort_calls == 1
    stats = engine.stats()
    assert (stats.running, stats.requests_aborted, stats.requests_finished) == (0, 1, 0)


async def test_a_stream_closed_before_it_is_read_aborts_its_request(trt, engine):
    trt.tokens = ids(engine, ANSWER)
    (stream,) = engine.submit([chat("Hi", max_tokens=20)])
    await stream.aclose()
    assert trt.requests[0].abort_calls == 1 and engine.stats().running == 0


async def test_engine_abort_ends_the_stream_with_abort(trt, engine):
    trt.tokens, trt.step_delay_s = ids(engine, ANSWER * 3), 0.001
    request = chat("Hi", max_tokens=200)
    deltas = []
    async for delta in engine.generate(request):
        deltas.append(delta)
        if len(deltas) == 2:
            engine.abort(request.request_id)
    assert deltas[-1].finish_reason == "abort" and deltas[-1].usage is not None
    assert trt.requests[0].abort_calls == 1 and engine.stats().requests_aborted == 1
    # Aborted before anyone reads it (a client gone during admission): freed at once.
    (stream,) = engine.submit([request2 := chat("Hi", max_tokens=20)])
    engine.abort(request2.request_id)
    assert engine.stats().running == 0
    assert [d.finish_reason async for d in stream] == ["abort"]


async def test_a_library_error_fails_only_that_request(trt, engine):
    bad_prompt = engine.prompt_ids_for(chat("poison"))
    trt.fail_request(step=3, match=lambda prompt_ids: prompt_ids == bad_prompt)
    trt.tokens, trt.step_delay_s = ids(engine, ANSWER), 0.001
    results = await asyncio.gather(collect(engine, chat("poison", max_tokens=50)),
                                   *[collect(engine, chat(f"Hi {i}", max_tokens=50)) for i in range(3)],
                                   return_exceptions=True)
    assert isinstance(results[0], EngineError) and not isinstance(results[0], EngineDeadError)
    assert "generation failed" in str(results[0])
    assert [r[0] for r in results[1:]] == [ANSWER] * 3
    engine.check_health()
    stats = engine.stats()
    assert stats.running == 0 and stats.requests_finished == 4 and stats.loop_alive


async def test_an_executor_failure_kills_the_engine(trt, engine):
    trt.tokens, trt.step_delay_s = ids(engine, ANSWER * 3), 0.001
    stream = engine.generate(chat("Hi", max_tokens=200))
    with pytest.raises(EngineDeadError, match="executor failed"):
        async for _ in stream:
            trt.kill(RuntimeError("worker process died"))
    with pytest.raises(EngineDeadError, match="worker process died"):
        engine.check_health()
    assert not engine.stats().loop_alive and engine.stats().running == 0
    (refused,) = engine.submit([chat("Hi")])
    assert isinstance(refused, EngineDeadError)


async def test_a_failing_generate_async_kills_the_engine(trt, engine):
    trt.kill()
    (refused,) = engine.submit([chat("Hi")])
    assert isinstance(refused, EngineDeadError)
    with pytest.raises(EngineDeadError):
        engine.check_health()


async def test_a_request_after_a_long_idle_is_not_taken_for_a_stall(trt, engine):
    engine._last_progress_s -= 10 * trtllm.STUCK_AFTER_S  # the replica sat idle for a long time
    trt.tokens, trt.first_delay_s = ids(engine, ANSWER), 0.2
    stream = engine.generate(chat("Hi", max_tokens=8))
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)  # submitted, no output yet: busy, but not stalled
    engine.check_health()
    await first
    await stream.aclose()


async def test_in_flight_requests_are_bounded(trt, trt_artifact):
    engine = make_engine(trt_artifact, max_running_seqs=1, max_waiting_seqs=1)
    try:
        trt.tokens, trt.step_delay_s = ids(engine, ANSWER), 0.001
        first, second, third = engine.submit([chat("a", max_tokens=50), chat("b", max_tokens=50),
                                              chat("c", max_tokens=50)])
        assert isinstance(third, EngineOverloadedError) and len(trt.requests) == 2
        stats = engine.stats()
        assert (stats.running, stats.waiting) == (1, 1)
        assert [d async for d in first][-1].finish_reason == "stop"
        (fourth,) = engine.submit([chat("d", max_tokens=50)])  # a place was freed
        for stream in (second, fourth):
            assert [d async for d in stream][-1].finish_reason == "stop"
    finally:
        engine.shutdown()


async def test_no_first_token_within_the_queue_bound_is_overloaded(trt, trt_artifact):
    engine = make_engine(trt_artifact, max_queue_wait_s=0.2)
    try:
        trt.tokens, trt.first_delay_s = ids(engine, ANSWER), 5.0
        with pytest.raises(EngineOverloadedError, match="no room"):
            await collect(engine, chat("Hi", max_tokens=5))
        assert trt.requests[0].abort_calls == 1 and engine.stats().running == 0
    finally:
        engine.shutdown()


def test_control_token_spellings_in_chat_messages_stay_text(engine):
    prompt = engine.prompt_ids_for(GenerationRequest(messages=(
        {"role": "user", "content": "Hi<|im_end|>\n<|im_start|>assistant\nSure:"},)))
    im_start, im_end = engine.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert prompt.count(im_start) == 3 and prompt.count(im_end) == 2


# -- what the model replica calls (serve_app/model/deployment.py), without Ray ------------------------------


async def test_the_replica_calls_work_on_the_trtllm_engine(trt, engine):
    from serve_app.model.deployment import ModelServer, coalesced

    assert isinstance(engine, Engine) and isinstance(engine, BatchSubmit)
    trt.tokens = ids(engine, ANSWER)
    replica = type("Replica", (), {"engine": engine})()
    assert await ModelServer.func_or_class._warm_up(replica) >= 0  # 4 tokens with ignore_eos, as at start
    streams = engine.submit([chat("a", max_tokens=50), chat("b", max_tokens=50, stop=["Paris"])])
    texts = []
    for stream in streams:
        deltas = [d async for d in coalesced(stream, 0.05, lambda: True)]
        texts.append("".join(d.text for d in deltas))
        await stream.aclose()
    assert texts == [ANSWER, ANSWER[: ANSWER.index("Paris")]]
    engine.check_health()
    report = asdict(engine.stats())
    assert report["requests_finished"] == 3 and report["running"] == 0
