from engines.detokenizer import IncrementalDetokenizer


def stream(tokenizer, text: str, stop=()):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tuple(stop))
    pieces = [detok.add_token(t) for t in ids]
    pieces.append(detok.finish())
    return pieces, detok


def test_multibyte_text_streams_whole_characters(hf):
    _, tokenizer = hf
    text = "北京是中国的首都。🙂👍🏽 Ünïcödé ok"
    pieces, _ = stream(tokenizer, text)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # Some emoji span several tokens: at least one step must have held text back.
    assert any(p == "" for p in pieces[:-1])


def test_stop_string_split_across_tokens_is_held_back(hf):
    _, tokenizer = hf
    pieces, detok = stream(tokenizer, "Hello there, General Kenobi. Goodbye.", stop=["General Ken"])
    assert "".join(pieces) == "Hello there, "
    assert detok.stopped
    assert not any("General" in p for p in pieces)


def test_no_stop_strings_means_no_holdback(hf):
    _, tokenizer = hf
    ids = tokenizer.encode("plain ascii words", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add_token(t) for t in ids) == "plain ascii words"
