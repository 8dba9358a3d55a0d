"""Chat prompts whose client text can never turn into control tokens.

A chat template is text; tokenizing the rendered text as a whole lets a message that contains
``<|im_end|>`` (or any special token's spelling) become that token: a user could close their own
turn and write the system's or the assistant's. So the template is rendered with a unique marker in
place of each message's content; the template's own text is tokenized with special tokens (its
``<|im_start|>`` must be the token), and each content is tokenized with special tokens split
(``split_special_tokens``), so it stays the characters it was. For ordinary text the ids are the
same as tokenizing the whole rendered prompt (the tests check it); a content that starts or ends
with whitespace may tokenize differently at its edges.
"""

from __future__ import annotations

import re
import uuid

from .protocol import InvalidRequestError


def render_marked(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, str]:
    """The template's text with a marker in place of each message's content, and the markers' nonce."""
    nonce = uuid.uuid4().hex
    marked = [{**m, "content": f"\ue000{nonce}{i}\ue001"} for i, m in enumerate(messages)]
    return tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False), nonce


def encode_marked(tokenizer, text: str, nonce: str, messages: list[dict]) -> list[int]:
    """Tokenize marked template text: the template's pieces with special tokens, each marked
    message's content with special tokens split."""
    pieces = re.split(f"\ue000{nonce}(\\d+)\ue001", text)
    ids: list[int] = []
    for n, piece in enumerate(pieces):
        if n % 2:  # a message's content
            ids += tokenizer.encode(messages[int(piece)]["content"], add_special_tokens=False,
                                    split_special_tokens=True)
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The prompt ids of ``messages`` (each ``{"role", "content"}``) under the tokenizer's template."""
    text, nonce = render_marked(tokenizer, messages, add_generation_prompt)
    found = sorted(int(i) for i in re.findall(f"\ue000{nonce}(\\d+)\ue001", text))
    if found != list(range(len(messages))):
        raise ValueError("the chat template does not render each message's content once, as given")
    return encode_marked(tokenizer, text, nonce, messages)


def request_prompt_ids(request, tokenizer, vocab_size: int) -> list[int]:
    """A request's prompt: its ``prompt_token_ids`` (checked against the vocabulary) or its chat
    messages through :func:`encode_chat`."""
    if request.prompt_token_ids is not None:
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in request.prompt_token_ids):
            raise InvalidRequestError(f"prompt_token_ids must be ints in [0, {vocab_size})", "prompt_token_ids")
        return list(request.prompt_token_ids)
    return encode_chat(tokenizer, list(request.messages))


def output_budget(prompt_len: int, wanted: int | None, max_seq_len: int, default_max_tokens: int) -> int:
    """The request's ``max_tokens``: what it asked for, else the default within the room left; a
    prompt or a total over ``max_seq_len`` is refused before any work (``InvalidRequestError``)."""
    room = max_seq_len - prompt_len
    if room < 1:
        raise InvalidRequestError(f"prompt is {prompt_len} tokens; this model serves at most {max_seq_len} tokens "
                                  "per sequence (prompt + output)", "messages")
    if wanted is not None and wanted > room:
        raise InvalidRequestError(f"prompt ({prompt_len} tokens) + max_tokens ({wanted}) exceeds the limit of "
                                  f"{max_seq_len} tokens per sequence", "max_tokens")
    return wanted if wanted is not None else min(room, default_max_tokens)
