"""Streaming detokenization with stop strings.

How this works: text is decoded from a sliding window of token ids (``prefix_offset`` ..
end), the approach of vLLM and TGI, so multi-byte characters split across tokens are only emitted
once complete (a trailing U+FFFD means "wait for the next token"). Stop strings are searched in
the accumulated text; the last ``len(longest stop) - 1`` characters are held back so a stop string
that is still forming never reaches the client. On a match the text is cut before the stop string.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all decoded text so far (cut at a stop string once matched)
        self._sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> str:
        """Feed one generated token; return the text that may now be shown (possibly empty).
        After a stop string matched, nothing more is returned."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The held-back remainder, at the end of the sequence."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._stop and not self.stopped:
            search_from = max(0, self._sent - self._holdback)
            hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i != -1]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        end = len(self.text) if (final or self.stopped) else max(self._sent, len(self.text) - self._holdback)
        out = self.text[self._sent : end]
        self._sent = end
        return out
