"""The application's configuration, as written under ``args:`` in ``serve_config.yaml``.

Per-deployment Serve settings (replicas, autoscaling, ``max_ongoing_requests``,
``max_queued_requests``, ``ray_actor_options``, ``user_config``) live in the ``deployments:`` list
of the same file, in Serve's own schema.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.config import EngineConfig

from .moderation import ModerationSettings


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("artifacts/smollm2-135m-instruct",
                       description="Engine artifact dir (python -m engines.build), HF model dir, .gguf file or hub id")
    served_model_name: str = Field("smollm2-135m-instruct", description="The id clients use in the `model` field")
    engine: str = Field("torch", description="Engine backend: torch (CPU/GPU) or trtllm (unsupported yet)")
    device: str = Field("auto", description="cpu, cuda or auto")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_running_seqs: int = Field(32, ge=1, description="Sequences decoded together in one engine step")
    max_seq_len: int = Field(2048, ge=16, description="Prompt + output tokens per sequence")
    kv_budget_tokens: int = Field(32768, ge=16, description="KV cache allocated for running sequences, in tokens")
    max_waiting_seqs: int = Field(256, ge=1, description="Engine waiting queue bound; beyond it requests get 503")
    default_max_tokens: int = Field(512, ge=1, description="Output limit when a request sets none")
    num_threads: int | None = Field(None, ge=1, description="torch threads per replica (default: all cores)")
    prefix_cache_tokens: int = Field(8192, ge=0, description="KV of finished sequences kept for reuse, in tokens")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(exclude={"served_model_name"}))


class DialogueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: Literal["memory", "redis"] = Field("memory", description="Session store backend")
    redis_url: str | None = Field(None, description="redis://host:port/db when store is redis (or env REDIS_URL)")
    context_budget_tokens: int = Field(1792, ge=64, description="Prompt tokens a session's next turn may use")
    context_trim_fraction: float = Field(
        0.6, gt=0, le=1, description="When the budget is exceeded, drop oldest turns until the prompt fits in this "
        "fraction of it, so the next turns append to a stable prefix (see serve_app/context.py)")
    session_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="Sessions expire this long after last activity")
    default_system_prompt: str | None = Field(None, description="System prompt of new sessions that give none")
    max_message_chars: int = Field(32_000, ge=1, description="Longest user message accepted")


class AppSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = ModelSettings()
    dialogue: DialogueSettings = DialogueSettings()
    moderation: ModerationSettings = ModerationSettings()
    ws_heartbeat_s: float = Field(30.0, gt=0, description="Server ping interval on WebSocket connections")
