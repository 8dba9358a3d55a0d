"""The moderation stage on its own: blocked-word detection and the streaming output masker."""

import itertools

import pytest

from serve_app.config import AppSettings, ModerationSettings
from serve_app.ingress.moderation import Moderator

WORDS = ["ass", "bad word", "傻瓜", "abcd", "ab", "c++"]


@pytest.fixture(scope="module")
def moderator() -> Moderator:
    return Moderator(WORDS)


@pytest.mark.parametrize("text, expected", [
    ("you ASS!", "ass"),
    ("Ass", "ass"),
    ("a class act", None),           # inside a word: no match
    ("big assets", None),
    ("pass_ass_word", "ass"),        # underscore is not a letter
    ("ass2", None),                  # digits are part of a word
    ("我是ass", "ass"),               # next to CJK characters a word still matches
    ("that is a BAD Word.", "bad word"),
    ("bad\n\t  word", "bad word"),   # any whitespace run inside a phrase
    ("badword", None),
    ("bad words", None),
    ("你是傻瓜吗", "傻瓜"),            # no word boundaries in Chinese: a substring match
    ("傻 瓜", None),
    ("ａｓｓ", "ass"),                 # NFKC: full-width letters
    ("I like c++ a lot", "c++"),     # ends in a symbol: no end boundary needed
    ("c+++", "c++"),
    ("abc", None),
    ("xab", None),
    ("", None),
])
def test_check_input(moderator, text, expected):
    assert moderator.check_input(text) == expected


def test_longest_word_wins(moderator):
    assert moderator.check_input("abcd") == "abcd"
    assert moderator.mask("ab abcd abc") == "** **** abc"


def test_no_words_passes_everything():
    moderator = Moderator([])
    assert moderator.check_input("anything at all") is None
    masker = moderator.output_masker()
    assert masker.feed("anything") == "anything" and masker.finish() == ""


def test_words_from_settings_and_file(tmp_path):
    path = tmp_path / "blocked.txt"
    path.write_text("# a comment line\n\n  Darn It  \n禁止词\n  # indented comment\nheck\n", encoding="utf-8")
    moderator = Moderator.from_settings(ModerationSettings(blocked_words=["gosh"], blocked_words_file=str(path)))
    assert set(moderator.words) == {"gosh", "Darn It", "禁止词", "heck"}
    assert moderator.check_input("oh darn it") == "Darn It"
    assert moderator.check_input("这是禁止词") == "禁止词"
    assert moderator.check_input("a comment line") is None
    assert moderator.check_input("oh GOSH") == "gosh"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="blocked_words_file"):
        Moderator.from_settings(ModerationSettings(blocked_words_file=str(tmp_path / "nope.txt")))


def test_app_settings_default_is_off():
    settings = AppSettings()
    assert settings.moderation.blocked_words == [] and settings.moderation.mask_output is False
    assert Moderator.from_settings(settings.moderation).check_input("ass") is None
    with pytest.raises(ValueError):
        ModerationSettings(mask_char="**")


def test_mask_keeps_everything_else(moderator):
    text = "Ass class, bad\nword! 你是傻瓜 c++ ab-abcd."
    assert moderator.mask(text) == "*** class, ***\n****! 你是** *** **-****."
    assert Moderator(["ass"], mask_char="#").mask("ASS ass") == "### ###"


def test_output_phrases_match_one_whitespace_character(moderator):
    # The documented limit of the streaming rule (it keeps the holdback bounded); the input check
    # collapses whitespace runs first, so there the phrase is still found.
    assert moderator.mask("bad  word") == "bad  word"
    assert moderator.check_input("bad  word") == "bad word"


TEXTS = [
    "you ass, a class act: assets and ASS.",
    "bad word, bad  words, a bad\nword",
    "你是傻瓜吗？傻瓜ab abc abcd abcde ab",
    "c++ c+ c+++ xab ab_ass ass",
    "ass",
]


def _emitted_by(moderator: Moderator, chunks: list[str], expected: str) -> str:
    masker = moderator.output_masker()
    out = ""
    fed = 0
    for chunk in chunks:
        out += masker.feed(chunk)
        fed += len(chunk)
        # Nothing emitted early that the whole text masks, and the holdback stays bounded.
        assert expected.startswith(out), (chunks, out)
        assert fed - len(out) == masker.held_chars <= moderator.max_word_chars
    return out + masker.finish()


@pytest.mark.parametrize("text", TEXTS)
def test_masking_a_stream_equals_masking_the_whole_text(moderator, text):
    expected = moderator.mask(text)
    assert expected != text  # the texts do contain blocked words
    n = len(text)
    for i in range(n + 1):
        assert _emitted_by(moderator, [text[:i], text[i:]], expected) == expected
    for i, j in itertools.combinations(range(n + 1), 2):
        assert _emitted_by(moderator, [text[:i], text[i:j], text[j:]], expected) == expected
    assert _emitted_by(moderator, list(text), expected) == expected


def test_holdback_only_for_possible_matches(moderator):
    masker = moderator.output_masker()
    assert masker.feed("hello world ") == "hello world "      # nothing that could start a word
    assert masker.feed("cl") == "cl"                          # "cl..." can't become "c++"
    assert masker.feed("ass a") == "ass "                     # "class" is safe; "a" may start "ass"
    assert masker.feed("s") == ""
    assert masker.feed("s") == ""                             # "ass" whole only if no letter follows
    assert masker.feed("!") == "***!"
    assert masker.feed(" ab") == " "
    assert masker.finish() == "**"                            # end of stream: "ab" is a whole word
