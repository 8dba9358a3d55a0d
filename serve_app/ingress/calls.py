"""Calling the other deployments from the ingress: every failure of a handle call becomes an
:class:`~serve_app.errors.ApiError`, and a model stream is opened and peeked, so a request that
fails before its first token (prompt too long, overload) still gets a proper 4xx/5xx status."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from engines.protocol import Delta, GenerationRequest

from ..errors import to_api_error


async def call(response):
    """Await a handle call, mapping any failure to an :class:`ApiError`."""
    try:
        return await response
    except Exception as exc:  # noqa: BLE001 - mapped to a status
        raise to_api_error(exc) from None


class ModelStream:
    """A model replica's delta stream, opened and peeked: errors before the first delta raise here.
    Leaving the iteration before the last delta cancels the request on the replica."""

    def __init__(self, response):
        self._response = response
        self.first: Delta | None = None
        self.finished = False

    @classmethod
    async def open(cls, handle: DeploymentHandle, request: GenerationRequest, affinity_key: str | None) -> ModelStream:
        stream = cls(handle.options(stream=True).generate.remote(request, affinity_key=affinity_key))
        try:
            stream.first = await stream._response.__anext__()
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            stream.cancel()
            raise to_api_error(exc) from None
        except BaseException:  # cancelled: the model request goes too
            stream.cancel()
            raise
        return stream

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            delta = self.first
            while True:
                yield delta
                if delta.finish_reason is not None:
                    self.finished = True
                    return
                delta = await self._response.__anext__()
        finally:
            if not self.finished:
                self.cancel()

    def cancel(self) -> None:
        try:
            self._response.cancel()
        except Exception:  # noqa: BLE001 - already finished
            pass
