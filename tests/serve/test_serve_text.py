"""Streaming text: UTF-8-safe incremental decoding and stop strings, against whole-string decoding."""

from __future__ import annotations

import pytest

from adapterhub.serve.text import IncrementalDecoder, StopMatcher


def byte_decode(ids):
    # A byte-level tokenizer: each token is one byte; incomplete UTF-8 decodes to U+FFFD.
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🙂🚀", "ä"])
def test_decoder_deltas_concatenate_to_the_whole_text_and_never_split_a_character(text):
    decoder = IncrementalDecoder(byte_decode)
    deltas = [decoder.push(b) for b in text.encode()]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # Multi-byte characters are held back until complete: some pushes return "".
    assert deltas.count("") >= len(text.encode()) - len(text)


def test_decoder_flush_releases_an_incomplete_character_as_replacement():
    decoder = IncrementalDecoder(byte_decode)
    assert decoder.push(ord("a")) == "a"
    assert decoder.push(0xE6) == ""  # first byte of a 3-byte character
    assert decoder.flush() == "\ufffd"


def test_decoder_keeps_merged_spaces_of_a_sentencepiece_style_tokenizer():
    # Tokens that only render their leading space when followed by more text ("▁" pieces).
    vocab = {0: "▁Hello", 1: "▁world", 2: "!"}

    def decode(ids):
        return "".join(vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    decoder = IncrementalDecoder(decode)
    out = "".join(decoder.push(i) for i in [0, 1, 2, 1]) + decoder.flush()
    assert out == decode([0, 1, 2, 1]) == "Hello world! world"


@pytest.mark.parametrize("chunks", [["Hello ST", "OP there"], ["Hello S", "T", "O", "P"], ["Hello STOP"]])
def test_stop_string_is_cut_and_its_prefix_held_back(chunks):
    matcher = StopMatcher(["STOP"])
    sent, is_stopped = [], False
    for chunk in chunks:
        text, is_stopped = matcher.push(chunk)
        sent.append(text)
        if is_stopped:
            break
    assert is_stopped
    assert "".join(sent) == "Hello "
    assert not any("S" in s for s in sent)  # a possible prefix of "STOP" was never sent early


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop():
    matcher = StopMatcher(["\n\n", "END"])
    assert matcher.push("ab\n") == ("ab", False)
    assert matcher.push("c E") == ("\nc ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.flush() == "EN"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(["xyz", "b"])
    assert matcher.push("a b xyz") == ("a ", True)
