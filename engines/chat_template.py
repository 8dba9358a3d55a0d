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
