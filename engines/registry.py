"""Backends registered by name; a backend's module is imported only when it is chosen, so a CPU
machine never imports TensorRT-LLM."""

from __future__ import annotations

from collections.abc import Callable

from .config import EngineConfig
from .protocol import Engine, InvalidRequestError

_FACTORIES: dict[str, Callable[[EngineConfig], Engine]] = {}


def register(name: str) -> Callable[[Callable[[EngineConfig], Engine]], Callable[[EngineConfig], Engine]]:
    def wrap(factory: Callable[[EngineConfig], Engine]) -> Callable[[EngineConfig], Engine]:
        _FACTORIES[name] = factory
        return factory

    return wrap


def available_engines() -> list[str]:
    return sorted(_FACTORIES)


def create_engine(config: EngineConfig) -> Engine:
    try:
        factory = _FACTORIES[config.engine]
    except KeyError:
        raise InvalidRequestError(
            f"unknown engine {config.engine!r}; available: {', '.join(available_engines())}", "engine"
        ) from None
    return factory(config)


@register("torch")
def _create_torch(config: EngineConfig) -> Engine:
    from .torch_engine import TorchEngine

    return TorchEngine(config)


@register("trtllm")
def _create_trtllm(config: EngineConfig) -> Engine:
    from .trtllm import create_trtllm_engine

    return create_trtllm_engine(config)
