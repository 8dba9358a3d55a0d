"""Append-only prompts and the stepwise context window (serve_app/context.py), with the real tokenizer."""

import pytest

from engines.artifacts import load_tokenizer
from engines.protocol import InvalidRequestError
from serve_app.context import PromptBuilder
from serve_app.schemas import Turn

SYSTEM = [{"role": "system", "content": "You are terse."}]


@pytest.fixture(scope="module")
def tokenizer(artifact_dir):
    return load_tokenizer(artifact_dir)


def reply(tokenizer, i: int, words: int = 12) -> tuple[str, list[int]]:
    """A reply as the engine would return it: its ids end with the end-of-turn token."""
    text = " ".join(f"answer{i}-{k}" for k in range(words))
    return text, tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def converse(builder: PromptBuilder, tokenizer, n: int, words: int = 12):
    """Run n turns; yield (window, turns before it) for each."""
    turns: list[Turn] = []
    for i in range(n):
        window = builder.next_window(SYSTEM, turns, f"question number {i}, please answer")
        yield window, list(turns)
        text, ids = reply(tokenizer, i, words)
        turns.append(Turn(user=f"question number {i}, please answer", assistant=text, finish_reason="stop",
                          context_ids=window.context_ids, reply_ids=builder.reply_ids(ids, text),
                          window_start=window.window_start))


def full_render(tokenizer, turns: list[Turn], content: str) -> str:
    history = [m for t in turns for m in ({"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant})]
    return tokenizer.apply_chat_template(SYSTEM + history + [{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def test_next_prompt_extends_previous_prompt_and_reply(tokenizer):
    builder = PromptBuilder(tokenizer, budget_tokens=4096, trim_fraction=0.6)
    previous = None
    for i, (window, turns) in enumerate(converse(builder, tokenizer, 5)):
        # The same conversation the chat template renders from the text...
        assert tokenizer.decode(window.prompt_ids) == full_render(tokenizer, turns, f"question number {i}, please answer")
        if previous is not None:
            # ...built by appending to the previous prompt and the reply's own ids.
            extended = previous.prompt_ids + turns[-1].reply_ids
            assert window.prompt_ids[: len(extended)] == extended
            assert window.append_only and window.window_start == 0
        previous = window


def test_window_slides_in_one_step_then_appends_again(tokenizer):
    builder = PromptBuilder(tokenizer, budget_tokens=300, trim_fraction=0.5)
    windows = [w for w, _ in converse(builder, tokenizer, 9, words=20)]
    starts = [w.window_start for w in windows]
    assert all(len(w.prompt_ids) <= 300 for w in windows)
    assert starts == sorted(starts) and starts[-1] > 0
    slides = [i for i in range(1, len(starts)) if starts[i] != starts[i - 1]]
    assert slides, starts
    for i in slides:
        assert len(windows[i].prompt_ids) <= 150 and not windows[i].append_only
        assert starts[i] - starts[i - 1] >= 2  # several turns dropped at once, not one per turn
    # Between slides every turn extends the previous prompt, so the prefix cache can hit.
    for i in range(1, len(windows)):
        if i not in slides:
            assert windows[i].append_only
            assert windows[i].prompt_ids[: len(windows[i - 1].prompt_ids)] == windows[i - 1].prompt_ids


def test_turns_without_ids_are_re_rendered(tokenizer):
    builder = PromptBuilder(tokenizer, budget_tokens=4096, trim_fraction=0.6)
    turns = [Turn(user="hi", assistant="hello there", finish_reason="stop")]
    window = builder.next_window(SYSTEM, turns, "and now?")
    assert not window.append_only
    assert tokenizer.decode(window.prompt_ids) == full_render(tokenizer, turns, "and now?")


def test_reply_cut_by_a_stop_string_keeps_the_saved_text(tokenizer):
    builder = PromptBuilder(tokenizer, budget_tokens=4096, trim_fraction=0.6)
    generated = tokenizer.encode("one two STOP three", add_special_tokens=False)
    assert builder.reply_ids(generated, "one two ") == tokenizer.encode("one two ", add_special_tokens=False)
    assert builder.reply_ids(generated, "one two STOP three") == generated


def test_message_longer_than_the_budget_is_rejected(tokenizer):
    builder = PromptBuilder(tokenizer, budget_tokens=64, trim_fraction=0.6)
    with pytest.raises(InvalidRequestError, match="context budget is 64"):
        builder.next_window(SYSTEM, [], "word " * 200)
