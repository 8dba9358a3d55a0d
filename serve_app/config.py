"""The application's settings: the ``args:`` of an application in ``serve_config.yaml``.

Every default is written once. Engine settings (``args.model``) take theirs from
:class:`engines.config.EngineConfig`; the rest are here. ``serve_config.yaml`` sets only what this
deployment chooses; ``python -m serve_app.config`` prints every setting with its default and
description. Per-deployment Serve options (replicas, autoscaling, ``max_ongoing_requests``,
``ray_actor_options``, ``user_config``) are Serve's own schema, in the ``deployments:`` list of the
same file (see ``serve_app/app.py``).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.artifacts import DEFAULT_MODEL_NAME
from engines.config import EngineConfig

_ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)
                    if f.default is not dataclasses.MISSING}


def _engine(name: str, description: str, **constraints):
    """A field of ``args.model`` that passes through to :class:`EngineConfig`, with its default."""
    return Field(_ENGINE_DEFAULTS[name], description=description, **constraints)


class ModelSettings(BaseModel):
    """``args.model``: the model replicas' engine (every field but ``served_model_name`` is an
    :class:`EngineConfig` field)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL_NAME, description="Engine artifact dir (python -m engines.build), HF model dir, "
                       ".gguf file or hub id; the default names the artifact `make setup` builds")
    served_model_name: str = Field(DEFAULT_MODEL_NAME, description="The id clients use in the `model` field")
    engine: str = _engine("engine", "Engine backend: torch (CPU/GPU) or trtllm")
    device: str = _engine("device", "cpu, cuda or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _engine(
        "dtype", "Weights and KV cache precision; auto: bfloat16 on CUDA and on CPUs with native bf16 "
        "(AVX512-BF16, AMX), else float32")
    max_running_seqs: int = _engine("max_running_seqs", "Sequences decoded together in one engine step", ge=1)
    max_seq_len: int | None = _engine("max_seq_len", "Prompt + output tokens per sequence (default: the model's "
                                      "own context length, bounded by kv_budget_tokens)", ge=16)
    kv_budget_tokens: int = _engine("kv_budget_tokens", "KV cache allocated for running sequences, in tokens", ge=16)
    max_waiting_seqs: int = _engine("max_waiting_seqs", "Engine waiting queue bound; beyond it requests get 503 "
                                    "at once", ge=1)
    default_max_tokens: int = _engine("default_max_tokens", "Output limit when a request sets none", ge=1)
    num_threads: int | None = _engine("num_threads", "torch threads per replica (default: all cores)", ge=1)
    prefix_cache_tokens: int = _engine("prefix_cache_tokens", "KV of finished sequences kept for reuse, in tokens",
                                       ge=0)
    max_batched_tokens: int = _engine("max_batched_tokens", "Tokens in one forward (decodes + prompt chunks): bounds "
                                      "how long a step takes while long prompts are read", ge=1)
    max_queue_wait_s: float = _engine("max_queue_wait_s", "A request not given a row within this long gets 503 "
                                      "with Retry-After", gt=0)
    gpu_memory_fraction: float = _engine("gpu_memory_fraction", "CUDA: share of the GPU memory free after the "
                                         "weights load that the KV cache may take (never more than "
                                         "kv_budget_tokens)", gt=0, le=1)
    cuda_graph_batch_sizes: tuple[int, ...] = _engine(
        "cuda_graph_batch_sizes", "CUDA: decode batch sizes captured as CUDA graphs at start (a step of n rows runs "
        "at the smallest >= n; capped at max_running_seqs); empty: no graphs")
    decode_mode: Literal["auto", "dynamic", "static"] = _engine(
        "decode_mode", "auto: static on CUDA (KV cache preallocated once, fixed-shape decode steps replayed as "
        "CUDA graphs), dynamic on CPU (KV cache grown as needed); static on CPU runs the fixed-shape path eagerly")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(exclude={"served_model_name"}))


class DialogueSettings(BaseModel):
    """``args.dialogue``: sessions, their store, and how each next prompt is built."""

    model_config = ConfigDict(extra="forbid")

    store: Literal["memory", "redis"] = Field("memory", description="Session store backend")
    redis_url: str | None = Field(None, description="redis://host:port/db when store is redis (or env REDIS_URL, "
                                  "else redis://127.0.0.1:6379/0)")
    redis_key_prefix: str = Field("chatserve:", description="Prefix of every Redis key this app writes")
    cold_store: Literal["none", "postgres"] = Field(
        "none", description="Durable tier behind Redis (store: redis): sessions idle past hot_ttl_s move to "
        "PostgreSQL and come back on their next read")
    postgres_url: str | None = Field(None, description="postgresql://user[:password]@host:port/db when cold_store "
                                     "is postgres (or env POSTGRES_URL, else postgresql://postgres@127.0.0.1:5432/"
                                     "chatserve); its schema is migrated at start")
    hot_ttl_s: float = Field(3600, gt=0, description="cold_store: a session idle this long leaves Redis for "
                             "PostgreSQL")
    archive_interval_s: float = Field(60, gt=0, description="cold_store: how often each dialogue replica looks "
                                      "for idle sessions to archive")
    context_budget_tokens: int | None = Field(
        None, ge=64, description="Prompt tokens a session's next turn may use (default: what the model serves per "
        "sequence, max_seq_len or its own context length, less default_max_tokens)")
    context_trim_fraction: float = Field(
        0.6, gt=0, le=1, description="When the budget is exceeded, drop oldest turns until the prompt fits in this "
        "fraction of it, so the next turns append to a stable prefix (see serve_app/dialogue/context.py)")
    session_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="Sessions expire this long after last activity")
    default_system_prompt: str | None = Field(None, description="System prompt of new sessions that give none")
    max_message_chars: int = Field(32_000, ge=1, description="Longest user message accepted")
    reply_retention_s: float = Field(600, gt=0, description="A finished reply's events stay resumable this long")
    max_reply_s: float = Field(900, gt=0, description="Longest a reply may take (its session stays locked meanwhile)")

    @model_validator(mode="after")
    def _tiers(self) -> DialogueSettings:
        if self.cold_store == "postgres" and self.store != "redis":
            raise ValueError("cold_store: postgres is the tier behind Redis: it needs store: redis")
        if self.cold_store == "postgres" and self.hot_ttl_s >= self.session_ttl_s:
            raise ValueError(f"hot_ttl_s ({self.hot_ttl_s:g}) must be shorter than session_ttl_s "
                             f"({self.session_ttl_s}): sessions would expire before they are archived")
        return self


class ModerationSettings(BaseModel):
    """``args.moderation``: a sensitive-word list, refused in input and optionally masked in replies."""

    model_config = ConfigDict(extra="forbid")

    blocked_words: list[str] = Field(default_factory=list, description="Words or phrases refused in user input")
    blocked_words_file: str | None = Field(
        None, description="File with more blocked words: one word or phrase per line, '#' starts a comment line; "
                          "a relative path resolves against the working directory")
    mask_output: bool = Field(False, description="Mask blocked words in the model's replies")
    mask_char: str = Field("*", min_length=1, max_length=1, description="Replaces each masked character")


class JwtSettings(BaseModel):
    """Bearer tokens issued by an identity provider (OIDC), verified against its JWKS."""

    model_config = ConfigDict(extra="forbid")

    jwks_url: str | None = Field(None, description="The provider's JWKS endpoint (https://...)")
    jwks_file: str | None = Field(None, description="Or a JWKS kept in a file (re-read when it changes)")
    issuer: str | None = Field(None, description="Required `iss` (None: not checked)")
    audience: str | None = Field(None, description="Required `aud` (None: not checked)")
    user_claim: str = Field("sub", description="The claim that names the user")
    algorithms: list[str] = Field(["RS256", "ES256"], description="Accepted signature algorithms")
    admin_users: list[str] = Field(default_factory=list, description="Users (by `user_claim`) with admin scope")

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtSettings:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("auth.jwt needs exactly one of jwks_url and jwks_file")
        return self


class TrustedProxySettings(BaseModel):
    """Identity from a header set by an authenticating reverse proxy. Only for a deployment whose
    ingress is reachable through that proxy alone: the header is believed as it comes."""

    model_config = ConfigDict(extra="forbid")

    user_header: str = Field(description="The header that names the user, e.g. X-Forwarded-User")
    admin_users: list[str] = Field(default_factory=list, description="Users with admin scope")


class AuthSettings(BaseModel):
    """``args.auth``: who may call, and as whom. Identity comes only from verified credentials."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["keys", "none"] = Field(
        "keys", description="keys: every request needs a credential (API key, JWT, or the trusted proxy's header); "
        "none: no authentication, the caller names itself with X-User-Id (a local trial only: loud at start)")
    keys_file: str = Field(".chatserve/keys.json", description="API keys (hashed) made by `python -m serve_app.admin "
                           "keys create`; relative paths resolve against the project root")
    jwt: JwtSettings | None = Field(None, description="Also accept JWTs from this identity provider")
    trusted_proxy: TrustedProxySettings | None = Field(None, description="Take the user from a proxy's header")
    ticket_ttl_s: float = Field(60, gt=0, le=600, description="Lifetime of a WebSocket ticket (browsers cannot "
                                "send an Authorization header on a WebSocket)")


class LimitSettings(BaseModel):
    """``args.limits``: per-identity rates and the sizes and counts an operator may want to tune. Fixed
    bounds (title 200 characters, 8 stop strings of 256, 512 messages a request) are in the request
    bodies; message and system prompt lengths are ``dialogue.max_message_chars``."""

    model_config = ConfigDict(extra="forbid")

    requests_per_min: int = Field(300, ge=1, description="API requests per identity per minute (token bucket)")
    tokens_per_min: int = Field(60_000, ge=1, description="Prompt + completion tokens per identity per minute")
    max_concurrent_replies: int = Field(8, ge=1, description="Replies being generated at once per identity, "
                                        "including those whose client left")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body (413 beyond)")
    max_sessions_per_owner: int = Field(1000, ge=1, description="Sessions an identity may keep")
    max_turns_per_session: int = Field(1000, ge=1, description="Turns a session may hold")
    max_room_members: int = Field(64, ge=1, description="Distinct members of a room")
    max_event_log_bytes: int = Field(4 * 1024 * 1024, ge=4096, description="Bytes of events a reply or room "
                                     "timeline keeps (oldest dropped beyond)")


class AppSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = ModelSettings()
    dialogue: DialogueSettings = DialogueSettings()
    moderation: ModerationSettings = ModerationSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    ws_heartbeat_s: float = Field(30.0, gt=0, description="Server ping interval on WebSocket connections")


def describe(model: type[BaseModel] = AppSettings, indent: str = "") -> list[str]:
    """Every setting as YAML lines: ``name: default  # description``."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and field.default is not None:
            lines += [f"{indent}{name}:", *describe(annotation, indent + "  ")]
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, tuple):
            default = list(default)  # YAML has no tuple syntax
        value = "null" if default is None else str(default).lower() if isinstance(default, bool) else repr(default)
        lines.append(f"{indent}{name}: {value}" + (f"  # {field.description}" if field.description else ""))
    return lines


if __name__ == "__main__":
    sys.stdout.write("\n".join(describe()) + "\n")
