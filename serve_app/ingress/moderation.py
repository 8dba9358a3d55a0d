"""Moderation stage: a sensitive-word list checked on user input and, optionally, masked in replies.

How a word matches (the same rule for input and output):
- case-insensitively (``re.IGNORECASE``: one text character per pattern character);
- as a whole word where its script separates words by spaces: if a word *starts* with a letter or
  digit of such a script, the character before the match must not be one; likewise at its *end*.
  So ``ass`` matches "Ass!" and "我是ass" but not "class" or "assets". Underscore is not a letter;
  ``bad_word`` style joins do not hide a word;
- as a plain substring for scripts written without spaces (CJK ideographs, kana, Thai, Lao, Khmer,
  Myanmar): ``傻瓜`` matches inside "你是傻瓜吗". Hangul is written with spaces and gets word rules;
- a phrase ("bad word") matches with any one whitespace character between its words; the input
  check first collapses whitespace runs to one space, so extra spaces do not hide a phrase.

``check_input`` also applies NFKC normalisation to the text (full-width ``ａｓｓ`` is ``ass``) and
drops format characters (``as\u200bs`` is ``ass``). The
output masker cannot (it must keep the reply's characters as they are), so it matches the reply as
written and replaces each non-space character of a match with ``mask_char``.

Streaming: :class:`OutputMasker` holds back only a tail that could still become a match (a prefix
of some word after a valid word start, or a whole word whose end boundary depends on the next
character), so at most ``len(longest word)`` characters, and usually none. Everything it emits is
final: feeding a reply in any pieces yields exactly ``Moderator.mask(whole reply)``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path

from engines.protocol import Delta

from ..config import ModerationSettings
from ..errors import ApiError

# Scripts written without spaces between words: their characters are never word boundaries.
_NO_SPACE_RANGES = ("\u0e00-\u0eff"  # Thai, Lao
                    "\u1000-\u109f"  # Myanmar
                    "\u1780-\u17ff"  # Khmer
                    "\u3040-\u30ff"  # Hiragana, Katakana
                    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
                    "\U00020000-\U0003134f")  # CJK extensions B..G
# A letter or digit of a script that separates words with spaces.
_WORD_CHAR = f"[^\\W_{_NO_SPACE_RANGES}]"
_WORD_CHAR_RE = re.compile(_WORD_CHAR)
_WHITESPACE_RE = re.compile(r"\s+")
_NON_SPACE_RE = re.compile(r"\S")


def _normalise(text: str) -> str:
    """NFKC, without format characters (zero-width spaces and joiners, soft hyphens, bidi marks:
    invisible, so they could split a word unseen), whitespace runs as one space."""
    text = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf")
    return _WHITESPACE_RE.sub(" ", text).strip()


def read_word_file(path: str | Path) -> list[str]:
    """The words in a blocked-words file: one per line; blank lines and '#' comment lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read blocked_words_file {str(path)!r}: {e}") from e
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _atoms(word: str) -> list[str]:
    """One regex atom per character of ``word``: the escaped character, or ``\\s`` for a space."""
    return [r"\s" if ch == " " else re.escape(ch) for ch in word]


def _nested_prefixes(atoms: list[str]) -> str:
    """A regex matching any non-empty prefix of ``atoms``: a(?:b(?:c)?)?"""
    inner = ""
    for atom in reversed(atoms[1:]):
        inner = f"(?:{atom}{inner})?"
    return atoms[0] + inner


class Moderator:
    """Blocked-word checks for user input and a masker factory for replies. Immutable; share it."""

    def __init__(self, words: Iterable[str], *, mask_output: bool = False, mask_char: str = "*"):
        unique: dict[str, str] = {}
        for word in words:
            word = _normalise(word)
            if word:
                unique.setdefault(word.lower(), word)
        # Longest first, so that at one position the longest word wins ("bad word" before "bad").
        self.words: tuple[str, ...] = tuple(sorted(unique.values(), key=lambda w: (-len(w), w)))
        self.mask_output = mask_output
        self.mask_char = mask_char
        self.max_word_chars = len(self.words[0]) if self.words else 0
        self._by_lower = unique
        self._pattern: re.Pattern[str] | None = None
        self._pending_pattern: re.Pattern[str] | None = None
        if self.words:
            self._pattern = re.compile("|".join(self._word_regex(w) for w in self.words), re.IGNORECASE)
            pending = [self._pending_regex(w) for w in self.words]
            self._pending_pattern = re.compile(f"(?:{'|'.join(p for p in pending if p)})\\Z", re.IGNORECASE)

    @classmethod
    def from_settings(cls, settings: ModerationSettings) -> Moderator:
        words = list(settings.blocked_words)
        if settings.blocked_words_file:
            words += read_word_file(settings.blocked_words_file)
        return cls(words, mask_output=settings.mask_output, mask_char=settings.mask_char)

    @staticmethod
    def _bounded_start(word: str) -> bool:
        return bool(_WORD_CHAR_RE.fullmatch(word[0]))

    @staticmethod
    def _bounded_end(word: str) -> bool:
        return bool(_WORD_CHAR_RE.fullmatch(word[-1]))

    def _word_regex(self, word: str) -> str:
        start = f"(?<!{_WORD_CHAR})" if self._bounded_start(word) else ""
        end = f"(?!{_WORD_CHAR})" if self._bounded_end(word) else ""
        return f"{start}{''.join(_atoms(word))}{end}"

    def _pending_regex(self, word: str) -> str:
        """Tails of a stream that may still turn into a match of ``word`` once more text arrives: its
        proper prefixes, and the whole word too when its end boundary depends on the next character."""
        atoms = _atoms(word) if self._bounded_end(word) else _atoms(word)[:-1]
        if not atoms:
            return ""
        start = f"(?<!{_WORD_CHAR})" if self._bounded_start(word) else ""
        return start + _nested_prefixes(atoms)

    def check_input(self, text: str) -> str | None:
        """The first blocked word found in ``text`` (as configured), or None if the text may pass."""
        if self._pattern is None:
            return None
        match = self._pattern.search(_normalise(text))
        if match is None:
            return None
        return self._by_lower.get(match.group().lower()) or self._configured(match.group())

    def _configured(self, matched: str) -> str:
        # Case pairs where lower() disagrees with re's case folding (rare): ask each word's own regex.
        for word in self.words:
            if re.fullmatch("".join(_atoms(word)), matched, re.IGNORECASE):
                return word
        return matched

    def mask(self, text: str) -> str:
        """``text`` with every blocked word's non-space characters replaced by ``mask_char``."""
        return self._mask_span(text, 0, len(text))[0]

    def _mask_span(self, text: str, start: int, stop: int) -> tuple[str, int]:
        """Mask the matches that start in ``text[start:stop]``; returns the masked text up to where the
        last of them ends (or ``stop``) and that end. ``text[:start]`` is context for the word boundary."""
        if self._pattern is None:
            return text[start:stop], stop
        out, pos = [], start
        for match in self._pattern.finditer(text, start):
            if match.start() >= stop:
                break
            out += [text[pos:match.start()], _NON_SPACE_RE.sub(self.mask_char, match.group())]
            pos = match.end()
        end = max(pos, stop)
        out.append(text[pos:end])
        return "".join(out), end

    def pending_start(self, text: str, start: int = 0) -> int:
        """Where the tail of ``text`` that could still become a match begins (``len(text)`` if none)."""
        if self._pending_pattern is None:
            return len(text)
        match = self._pending_pattern.search(text, max(start, len(text) - self.max_word_chars))
        return len(text) if match is None else match.start()

    def output_masker(self) -> OutputMasker:
        """A fresh masker for one streamed reply."""
        return OutputMasker(self)


class OutputMasker:
    """Masks blocked words in a stream of text deltas; ``feed`` each delta, then ``finish`` once.

    The concatenation of everything returned equals ``moderator.mask(whole text)``, and nothing is
    emitted that a later delta could turn into (part of) a match.
    """

    def __init__(self, moderator: Moderator):
        self._moderator = moderator
        self._context = ""  # the last emitted input character: the word-boundary look-behind needs it
        self._pending = ""

    def feed(self, text: str) -> str:
        """Masked text that is final now; may be empty while a possible match is held back."""
        return self._drain(self._pending + text, final=False)

    def finish(self) -> str:
        """The held-back tail, masked. The stream is over: a word at the very end is whole."""
        return self._drain(self._pending, final=True)

    @property
    def held_chars(self) -> int:
        return len(self._pending)

    def _drain(self, pending: str, final: bool) -> str:
        text = self._context + pending
        start = len(self._context)
        stop = len(text) if final else self._moderator.pending_start(text, start)
        out, end = self._moderator._mask_span(text, start, stop)
        if end > start:
            self._context = text[end - 1]
        self._pending = text[end:]
        return out


# -- the moderation stage of a turn -------------------------------------------------------------------

def check_input(moderator: Moderator | None, text: str, param: str = "content") -> None:
    """Input: a blocked message never reaches the model or the history (400 ``content_blocked``)."""
    if moderator is not None and (word := moderator.check_input(text)):
        raise ApiError(400, f"message blocked by the content policy (matched {word!r})", param=param,
                       code="content_blocked")


async def masked(stream: AsyncIterator[Delta], moderator: Moderator | None) -> AsyncIterator[Delta]:
    """Output: blocked words in the reply are masked, even across deltas."""
    masker = moderator.output_masker() if moderator is not None and moderator.mask_output else None
    async for delta in stream:
        if masker is not None:
            text = masker.feed(delta.text) + (masker.finish() if delta.finish_reason is not None else "")
            delta = replace(delta, text=text)
        yield delta
