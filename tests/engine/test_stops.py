"""StopMatcher: stop strings over streamed text are never emitted, and nothing else is lost."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.stops import StopMatcher


def stream(matcher: StopMatcher, chunks: list[str]) -> list[str]:
    return [matcher.push(c) for c in chunks]


def test_empty_stop_list_passes_everything_through() -> None:
    m = StopMatcher([])
    assert stream(m, ["abc", "", "de\n", "\n"]) == ["abc", "", "de\n", "\n"]
    assert not m.stopped
    assert m.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    m = StopMatcher(["", ""])
    assert stream(m, ["abc", "d"]) == ["abc", "d"]
    assert not m.stopped


def test_stop_inside_one_chunk() -> None:
    m = StopMatcher(["STOP"])
    assert m.push("abc STOP def") == "abc "
    assert m.stopped
    assert m.push("more") == ""
    assert m.flush() == ""


def test_stop_across_chunk_boundaries_is_never_emitted() -> None:
    m = StopMatcher(["\n\nUser:"])
    out = stream(m, ["Hello", " world\n", "\n", "Us", "e", "r", ": next"])
    assert out == ["Hello", " world", "", "", "", "", ""]
    assert m.stopped
    assert m.flush() == ""


def test_held_prefix_is_released_when_it_diverges() -> None:
    m = StopMatcher(["</end>"])
    assert m.push("x </") == "x "  # "</" might start the stop: held
    assert m.push("en") == ""  # still a prefix
    assert m.push("try") == "</entry"  # diverged: everything released
    assert not m.stopped
    assert m.push("<") == ""
    assert m.flush() == "<"  # the generation ended for another reason: held text comes out
    assert m.flush() == ""


def test_divergence_keeps_a_new_prefix_held() -> None:
    m = StopMatcher(["abab"])
    assert m.push("ab") == ""
    assert m.push("a") == ""  # "aba" is a prefix
    assert m.push("c") == "abac"  # diverged, and no suffix of "abac" starts the stop
    assert m.push("xaba") == "x"  # "aba" held again
    assert m.push("a") == "aba"  # "abaa" diverged, but its suffix "a" is a new prefix: still held
    assert m.push("b") == ""
    assert not m.stopped
    assert m.push("ab") == ""  # "abab" completes
    assert m.stopped


def test_overlapping_restart_is_found() -> None:
    # "aab" contains the stop "ab" starting at the second character: the first "a" must come out.
    m = StopMatcher(["ab"])
    assert m.push("a") == ""
    assert m.push("a") == "a"
    assert m.push("b") == ""
    assert m.stopped


def test_several_stops_earliest_occurrence_wins() -> None:
    m = StopMatcher(["world", "lo w", "xyz"])
    assert m.push("hello world") == "hel"
    assert m.stopped

    m = StopMatcher(["bbb", "a"])
    assert m.push("xbb") == "x"  # "bb" held for "bbb"
    assert m.push("ba") == ""  # "bbb" completes at index 0 before "a" at index 3
    assert m.stopped


def test_longest_possible_prefix_is_held_among_several_stops() -> None:
    m = StopMatcher(["abc", "bcd"])
    assert m.push("xab") == "x"  # "ab" (for abc) is held, not only "b"
    assert m.push("cz") == ""  # "abc" completed
    assert m.stopped


def test_flush_releases_held_text() -> None:
    m = StopMatcher(["###"])
    assert m.push("answer: 42 ##") == "answer: 42 "
    assert m.flush() == "##"
    assert not m.stopped


def test_unicode_stops() -> None:
    m = StopMatcher(["。\n", "🙂"])
    assert stream(m, ["你好", "。", "世界", "。", "\n后"]) == ["你好", "", "。世界", "", ""]
    assert m.stopped


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_streamed_output_is_the_text_before_the_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    m = StopMatcher(stops)
    emitted = ""
    for chunk in chunks:
        emitted += m.push(chunk)
        # Nothing emitted so far contains a stop string, and it is always a prefix of the text.
        assert not any(s in emitted for s in stops)
        assert text.startswith(emitted)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        # The stop that completes first (at the end of some chunk) cuts the text where it starts.
        end = next(b for b in bounds[1:] if any(s in text[:b] for s in stops))
        cut = min(i for i in (text[:end].find(s) for s in stops) if i >= 0)
        assert m.stopped
        assert emitted == text[:cut]
        assert m.flush() == ""
    else:
        assert not m.stopped
        assert emitted + m.flush() == text
