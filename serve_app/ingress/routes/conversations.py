"""OpenAI's Conversations API: a conversation is a session (``/v1/sessions/{id}`` shows the same
history), its items are the session's messages. Parse, call the dialogue deployment, shape
(``responses_format.py``)."""

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from ...schemas import new_conversation_id
from ..bodies import ConversationCreateRequest, ConversationUpdateRequest, ItemsCreateRequest
from ..calls import call
from ..identity import Owner
from ..responses_format import ConversationDeleted, ConversationObject, ItemList, MessageItem
from ..services import Svc
from ..turns import admit_messages

router = APIRouter()


@router.post("/v1/conversations")
async def create_conversation(svc: Svc, owner: Owner, body: ConversationCreateRequest | None = None
                              ) -> ConversationObject:
    body = body or ConversationCreateRequest()
    items = admit_messages(body.items, svc.moderator, svc.settings.dialogue.max_message_chars, "items") \
        if body.items else []
    view = await call(svc.dialogue.create_session.remote(owner, metadata=body.metadata, items=items,
                                                         session_id=new_conversation_id()))
    return ConversationObject.of(view)


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, svc: Svc, owner: Owner) -> ConversationObject:
    return ConversationObject.of(await call(svc.dialogue.get_session.remote(conversation_id, owner)))


@router.post("/v1/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, body: ConversationUpdateRequest, svc: Svc,
                              owner: Owner) -> ConversationObject:
    view = await call(svc.dialogue.update_metadata.remote(conversation_id, owner, body.metadata or {}))
    return ConversationObject.of(view)


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, svc: Svc, owner: Owner) -> ConversationDeleted:
    await call(svc.dialogue.delete_session.remote(conversation_id, owner))
    return ConversationDeleted(id=conversation_id)


@router.get("/v1/conversations/{conversation_id}/items")
async def list_items(conversation_id: str, svc: Svc, owner: Owner, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 20,
                     order: Literal["asc", "desc"] = "desc") -> ItemList:
    return ItemList.of(await call(svc.dialogue.list_items.remote(conversation_id, owner, after, limit, order)))


@router.post("/v1/conversations/{conversation_id}/items")
async def create_items(conversation_id: str, body: ItemsCreateRequest, svc: Svc, owner: Owner) -> ItemList:
    items = admit_messages(body.items, svc.moderator, svc.settings.dialogue.max_message_chars, "items")
    added = await call(svc.dialogue.add_items.remote(conversation_id, owner, items))
    return ItemList(data=[MessageItem.of(m) for m in added], first_id=added[0].id, last_id=added[-1].id,
                    has_more=False)


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, svc: Svc, owner: Owner) -> MessageItem:
    return MessageItem.of(await call(svc.dialogue.get_item.remote(conversation_id, owner, item_id)))


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, svc: Svc, owner: Owner) -> ConversationObject:
    return ConversationObject.of(await call(svc.dialogue.delete_item.remote(conversation_id, owner, item_id)))
