"""The streaming text decoder: deltas that add up to the whole text, never half a character."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyModel
from m2cache.engine.loading import load_tokenizer
from m2cache.model.tokenizer import StreamDecoder, Tokenizer
from m2cache.storage.reader import Store


@pytest.fixture(scope="module")
def tokenizer(tiny_store: TinyModel) -> Tokenizer:
    return load_tokenizer(Store(tiny_store.store))


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_streamed_deltas_add_up_to_the_decoded_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Streams of text, token by token: wörld, 日本語 and 🙂.", raw=True)
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_a_character_split_across_byte_tokens_comes_out_whole(tokenizer: Tokenizer) -> None:
    # the tiny tokenizer is byte-level BPE trained on English: 🙂 is four byte tokens
    ids = tokenizer.encode("🙂", raw=True)[1:]  # without BOS
    assert len(ids) > 1
    deltas = _stream(tokenizer, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1)
    assert deltas[-2:] == ["🙂", ""]


def test_a_character_left_unfinished_at_the_end_is_flushed_as_decode_gives_it(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🙂", raw=True)[:-1]  # the emoji's last byte never comes
    deltas = _stream(tokenizer, ids)
    assert deltas[-1].endswith("\ufffd") and "".join(deltas) == tokenizer.decode(ids)


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_streams_back_exactly_as_decode_gives_it(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, raw=True)
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in tokenizer.decode(ids)
