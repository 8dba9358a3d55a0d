"""OpenAI's Responses and Conversations objects on the wire, one pydantic type per object and per
stream event (shapes checked against the official SDK's ``openai.types.responses`` and
``openai.types.conversations``), and :class:`ResponseStream`, which turns a reply's log events into
the spec's event sequence:

    response.created → response.in_progress → response.output_item.added → response.content_part.added
    → response.output_text.delta … → response.output_text.done → response.content_part.done
    → response.output_item.done → response.completed (response.incomplete when max_output_tokens cut
    it or it was cancelled; response.failed when generation failed)

Every event carries a ``sequence_number``; the events are a function of the log alone, so reading
the same log again (``GET /v1/responses/{id}?stream=true&starting_after=N``) gives the same events
(``completed_at`` is set on stored responses only, from the saved turn).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..events import DeltaEvent, DoneEvent, ErrorEvent, LogEvent, PromptTokensDetails, TokenUsage, TurnEvent
from ..schemas import ItemPage, Message, ResponseRecord, Role, SessionView, StoredResponse

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
STATUS_OF_FINISH: dict[str, ResponseStatus] = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled",
                                               "abort": "cancelled"}


# -- items ---------------------------------------------------------------------------------------------

class InputText(BaseModel):
    type: Literal["input_text"] = "input_text"
    text: str


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list = Field(default_factory=list)


class MessageItem(BaseModel):
    """A message as a conversation item, an input item or a response's output item."""

    type: Literal["message"] = "message"
    id: str
    role: Role
    status: ItemStatus = "completed"
    content: list[InputText | OutputText]

    @classmethod
    def of(cls, message: Message, status: ItemStatus = "completed") -> MessageItem:
        part = OutputText(text=message.content) if message.role == "assistant" else InputText(text=message.content)
        return cls(id=message.id, role=message.role, status=status, content=[part])


class ItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MessageItem]
    first_id: str | None
    last_id: str | None
    has_more: bool

    @classmethod
    def of(cls, page: ItemPage) -> ItemList:
        return cls(data=[MessageItem.of(m) for m in page.data], first_id=page.first_id, last_id=page.last_id,
                   has_more=page.has_more)


# -- conversations ---------------------------------------------------------------------------------------

class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]

    @classmethod
    def of(cls, view: SessionView) -> ConversationObject:
        return cls(id=view.id, created_at=int(view.created_at), metadata=view.metadata)


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


# -- responses -------------------------------------------------------------------------------------------

class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int = 0  # no explicit cache writes: the prefix cache keeps what it served


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int

    @classmethod
    def of(cls, usage: TokenUsage) -> ResponseUsage:
        return cls(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens))


class ResponseError(BaseModel):
    code: str = "server_error"
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] | None = None


class ConversationRef(BaseModel):
    id: str


class TextFormat(BaseModel):
    type: Literal["text"] = "text"


class TextConfig(BaseModel):
    format: TextFormat = TextFormat()


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    model: str
    output: list[MessageItem]
    instructions: str | None
    metadata: dict[str, str]
    temperature: float | None
    top_p: float | None
    max_output_tokens: int | None
    previous_response_id: str | None
    conversation: ConversationRef | None
    truncation: Literal["auto", "disabled"]
    store: bool
    background: bool
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    usage: ResponseUsage | None = None
    parallel_tool_calls: bool = False
    tool_choice: Literal["none", "auto"] = "auto"
    tools: list = Field(default_factory=list)
    text: TextConfig = TextConfig()

    @classmethod
    def of(cls, record: ResponseRecord, status: ResponseStatus, output: list[MessageItem] | None = None,
           **fields) -> ResponseObject:
        conversation = ConversationRef(id=record.conversation_id) if record.conversation_id else None
        return cls(id=record.id, created_at=int(record.created_at), status=status, model=record.model,
                   output=output or [], instructions=record.instructions, metadata=record.metadata or {},
                   temperature=record.temperature, top_p=record.top_p, max_output_tokens=record.max_output_tokens,
                   previous_response_id=record.previous_response_id, conversation=conversation,
                   truncation=record.truncation, store=record.store, background=record.background, **fields)

    @classmethod
    def stored(cls, stored: StoredResponse) -> ResponseObject:
        """A completed response from the turn it made."""
        turn = stored.turn
        status = STATUS_OF_FINISH.get(turn.finish_reason, "completed")
        usage = TokenUsage(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                           total_tokens=turn.prompt_tokens + turn.completion_tokens,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=turn.cached_tokens))
        return cls.of(stored.record, status, [MessageItem.of(turn.output, "incomplete" if status != "completed"
                                                             else "completed")],
                      completed_at=int(turn.created_at), usage=ResponseUsage.of(usage),
                      incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete"
                      else None)


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# -- stream events: one type each ---------------------------------------------------------------------------

class StreamEvent(BaseModel):
    sequence_number: int


class ResponseEvent(StreamEvent):
    """An event that carries the whole response as it stands."""

    response: ResponseObject


class ContentEvent(StreamEvent):
    """An event about the content of the reply message."""

    item_id: str
    output_index: int = 0
    content_index: int = 0


class ResponseCreated(ResponseEvent):
    type: Literal["response.created"] = "response.created"


class ResponseInProgress(ResponseEvent):
    type: Literal["response.in_progress"] = "response.in_progress"


class OutputItemAdded(StreamEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    output_index: int = 0
    item: MessageItem


class ContentPartAdded(ContentEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: OutputText


class OutputTextDelta(ContentEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str
    logprobs: list = Field(default_factory=list)


class OutputTextDone(ContentEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str
    logprobs: list = Field(default_factory=list)


class ContentPartDone(ContentEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: OutputText


class OutputItemDone(StreamEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    output_index: int = 0
    item: MessageItem


class ResponseCompleted(ResponseEvent):
    type: Literal["response.completed"] = "response.completed"


class ResponseIncomplete(ResponseEvent):
    type: Literal["response.incomplete"] = "response.incomplete"


class ResponseFailed(ResponseEvent):
    type: Literal["response.failed"] = "response.failed"


class StreamError(StreamEvent):
    """The stream cannot go on (its log is gone); the response itself may still be retrieved."""

    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None


class ResponseStream:
    """One response's stream events from its reply's log events (see the module docstring)."""

    def __init__(self, record: ResponseRecord):
        self.record = record
        self.sequence = -1
        self.item_id: str | None = None
        self.parts: list[str] = []
        self.final: ResponseObject | None = None

    def _number(self) -> int:
        self.sequence += 1
        return self.sequence

    def snapshot(self) -> ResponseObject:
        """The response as it stands: the final object once the reply ended, else in progress."""
        if self.final is not None:
            return self.final
        return ResponseObject.of(self.record, "in_progress", self._output("in_progress"))

    def _output(self, status: ItemStatus) -> list[MessageItem]:
        if self.item_id is None:
            return []
        return [MessageItem(id=self.item_id, role="assistant", status=status,
                            content=[OutputText(text="".join(self.parts))])]

    def opening(self) -> list[StreamEvent]:
        response = ResponseObject.of(self.record, "in_progress")
        return [ResponseCreated(sequence_number=self._number(), response=response),
                ResponseInProgress(sequence_number=self._number(), response=response)]

    def feed(self, event: LogEvent) -> list[StreamEvent]:
        """The stream events one log event makes (none for events of other kinds)."""
        match event:
            case TurnEvent():
                self.item_id = event.item_id
                item = MessageItem(id=self.item_id, role="assistant", status="in_progress", content=[])
                return [OutputItemAdded(sequence_number=self._number(), item=item),
                        ContentPartAdded(sequence_number=self._number(), item_id=self.item_id,
                                         part=OutputText(text=""))]
            case DeltaEvent():
                self.parts.append(event.text)
                return [OutputTextDelta(sequence_number=self._number(), item_id=self.item_id, delta=event.text)]
            case DoneEvent():
                return self._done(event)
            case ErrorEvent():
                self.final = ResponseObject.of(self.record, "failed", self._output("incomplete"),
                                               error=ResponseError(message=event.message))
                return [ResponseFailed(sequence_number=self._number(), response=self.final)]
        return []

    def _done(self, event: DoneEvent) -> list[StreamEvent]:
        status = STATUS_OF_FINISH.get(event.finish_reason, "completed")
        item_status: ItemStatus = "completed" if status == "completed" else "incomplete"
        frames: list[StreamEvent] = []
        if self.item_id is not None:
            text = "".join(self.parts)
            frames += [OutputTextDone(sequence_number=self._number(), item_id=self.item_id, text=text),
                       ContentPartDone(sequence_number=self._number(), item_id=self.item_id,
                                       part=OutputText(text=text)),
                       OutputItemDone(sequence_number=self._number(), item=self._output(item_status)[0])]
        self.final = ResponseObject.of(
            self.record, status, self._output(item_status),
            usage=ResponseUsage.of(event.usage) if event.usage else None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None)
        last = ResponseCompleted if status == "completed" else ResponseIncomplete
        return [*frames, last(sequence_number=self._number(), response=self.final)]
