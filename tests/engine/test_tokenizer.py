"""WorldTokenizer against the rwkv package's TRIE_TOKENIZER, and IncrementalDecoder on split characters."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.tokenizer import EOS_ID, VOCAB_SIZE, IncrementalDecoder, WorldTokenizer

ENGLISH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    'foolishness... "Quoted" text, numbers 3.14159 and 1,000,000; URLs https://example.com/a?b=c#d.\n\n'
    "  Indented line\twith a tab.\r\nWindows line end. Ünïcödé àccents, naïve café."
)
CODE = '''def fib(n: int) -> int:
    """Fibonacci."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


class Foo(Bar):
    x = {"a": [1, 2, 3], 'b': (4,)}  # comment
    async def go(self): await asyncio.sleep(0.1)
'''
CHINESE = (
    "人工智能是计算机科学的一个分支。它企图了解智能的实质，"
    "并生产出一种新的能以人类智能相似的方式做出反应的智能机器。鱻龘𠀀𪚥"
)
JAPANESE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。カタカナ、ひらがな、漢字。ｶﾀｶﾅ"
KOREAN = "한국어는 대한민국과 조선민주주의인민공화국의 공용어이다. 훈민정음 ꙮ"
EMOJI = "Hi 🙂👍🏽 family 👨‍👩‍👧‍👦 astronaut 👩🏽‍🚀 flag 🏳️‍🌈 🇯🇵 keycap 1️⃣ melting 🫠 math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
MIXED = "Python 代码: print('你好, 世界 🌍') # コメント 주석 — «ok» ½ ∑ x² ≠ y\u200b\u00a0end"
TEXTS = {"english": ENGLISH, "code": CODE, "chinese": CHINESE, "japanese": JAPANESE, "korean": KOREAN}
TEXTS |= {"emoji": EMOJI, "mixed": MIXED}


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def trie() -> Any:
    spec = importlib.util.find_spec("rwkv")
    assert spec is not None
    assert spec.submodule_search_locations is not None
    pkg = Path(next(iter(spec.submodule_search_locations)))
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # type: ignore[import-untyped]

    return TRIE_TOKENIZER(str(pkg / "rwkv_vocab_v20230424.txt"))


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("name", list(TEXTS))
def test_encode_matches_reference(tok: WorldTokenizer, trie: Any, name: str) -> None:
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == trie.encode(text)
    assert EOS_ID not in ids
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_encode_matches_reference_on_any_text(tok: WorldTokenizer, trie: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == trie.encode(text)
    assert tok.decode(ids) == text


def test_token_table_matches_reference(tok: WorldTokenizer, trie: Any) -> None:
    assert tok.vocab_size == VOCAB_SIZE == 65536
    assert len(trie.idx2token) == 65529
    for i in range(VOCAB_SIZE):
        assert tok.token_bytes(i) == trie.idx2token.get(i, b""), i
    assert tok.token_bytes(-1) == b""
    assert tok.token_bytes(VOCAB_SIZE) == b""


def test_empty_and_eos(tok: WorldTokenizer) -> None:
    assert tok.encode("") == []
    assert tok.decode([]) == ""
    assert tok.decode([EOS_ID]) == ""  # end of text has no bytes
    assert tok.decode([65530, 65535]) == ""  # ids the tokenizer never produces


def test_decode_replaces_invalid_utf8(tok: WorldTokenizer) -> None:
    lead = tok.encode("🫠")[0]  # b"\xf0\x9f": the start of a 4-byte character
    assert tok.token_bytes(lead) == b"\xf0\x9f"
    assert tok.decode([lead]) == "\ufffd"
    assert tok.decode([lead, *tok.encode("ab")]) == "\ufffdab"


def split_character_ids(tok: WorldTokenizer, text: str) -> list[int]:
    ids = tok.encode(text)
    # The point of the text: some tokens are pieces of a character, not valid UTF-8 on their own.
    assert any(not is_utf8(tok.token_bytes(i)) for i in ids)
    return ids


@pytest.mark.parametrize("text", [CHINESE, EMOJI, KOREAN, "ꙮ𠀀a🫠", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢" * 3])
def test_incremental_decoder_token_by_token(tok: WorldTokenizer, text: str) -> None:
    ids = split_character_ids(tok, text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "" in pieces  # some tokens were held back until their character completed
    assert "".join(pieces) + dec.flush() == text
    assert dec.flush() == ""


def test_incremental_decoder_holds_until_the_character_completes(tok: WorldTokenizer) -> None:
    ids = tok.encode("🫠!")
    assert [tok.token_bytes(i) for i in ids] == [b"\xf0\x9f", b"\xab", b"\xa0", b"!"]
    dec = IncrementalDecoder(tok)
    assert [dec.push([i]) for i in ids] == ["", "", "🫠", "!"]


@pytest.mark.parametrize("tail", ["🫠", "𠀀", "龘"])
def test_flush_of_an_incomplete_tail_is_a_replacement_character(tok: WorldTokenizer, tail: str) -> None:
    ids = tok.encode("ok " + tail)
    dec = IncrementalDecoder(tok)
    text = dec.push(ids[:-1])  # the last byte of the character never comes
    assert text == "ok "
    assert dec.flush() == "\ufffd"
    assert dec.flush() == ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_streaming_decode_equals_whole_decode(tok: WorldTokenizer, data: st.DataObject) -> None:
    # Any id stream (byte tokens, pieces, whole words, garbage orders), cut into any groups: the streamed text
    # plus the flush equals the one-shot decode, invalid sequences included.
    pool = [*range(128, 256), 3318, 3319, 3255, 9810, 19103, 18292, 43875, *tok.encode("ab 人 🙂"), EOS_ID]
    ids = data.draw(st.lists(st.sampled_from(pool), max_size=30))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=8)))
    dec = IncrementalDecoder(tok)
    out, prev = [], 0
    for cut in [*cuts, len(ids)]:
        out.append(dec.push(ids[prev:cut]))
        prev = cut
    assert "".join(out) + dec.flush() == tok.decode(ids)
