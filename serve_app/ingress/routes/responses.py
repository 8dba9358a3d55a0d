"""OpenAI's Responses API: ``/v1/responses`` (create, streamed as SSE or answered whole or, with
``background``, at once), retrieve (or replay its stream), delete, cancel, input items. The flow:
``responses.py``; the objects and events: ``responses_format.py``."""

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from sse_starlette.sse import EventSourceResponse

from ...errors import ApiError
from ..bodies import ResponseCreateRequest
from ..identity import Caller, Owner
from ..responses_format import ItemList, ResponseDeleted, ResponseObject, StreamEvent
from ..services import Svc

router = APIRouter()


async def sse(events: AsyncIterator[StreamEvent]):
    async for event in events:
        yield {"id": str(event.sequence_number), "event": event.type, "data": event.model_dump_json()}


@router.post("/v1/responses")
async def create_response(body: ResponseCreateRequest, svc: Svc, caller: Caller):
    record, meta = await svc.responses.create(body, caller)
    if body.stream:
        return EventSourceResponse(sse(svc.responses.events(record, meta)), ping=15)
    if body.background:
        return ResponseObject.of(record, "in_progress")
    return await svc.responses.final(record, meta)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, svc: Svc, owner: Owner, stream: bool = False,
                            starting_after: Annotated[int | None, Query(ge=-1)] = None,
                            last_event_id: Annotated[str | None, Header()] = None):
    """``stream=true``: the response's events again, after ``starting_after`` (or ``Last-Event-ID``)."""
    if not stream:
        return await svc.responses.retrieve(response_id, owner)
    if starting_after is None and last_event_id is not None:
        if not last_event_id.isdigit():
            raise ApiError(400, "Last-Event-ID: a response's event ids are its sequence numbers",
                           param="Last-Event-ID")
        starting_after = int(last_event_id)
    return EventSourceResponse(sse(await svc.responses.replay(response_id, owner, starting_after)), ping=15)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, svc: Svc, owner: Owner) -> ResponseDeleted:
    await svc.responses.delete(response_id, owner)
    return ResponseDeleted(id=response_id)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, svc: Svc, owner: Owner) -> ResponseObject:
    return await svc.responses.cancel(response_id, owner)


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(response_id: str, svc: Svc, owner: Owner, after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20,
                      order: Literal["asc", "desc"] = "desc") -> ItemList:
    return await svc.responses.input_items(response_id, owner, after, limit, order)
