"""Output processing on real tokens: stop strings are held back only while they could still match."""

from server.engine.output import OutputProcessor
from server.engine.sampling_params import SamplingParams


def feed(tokenizer, text_pieces: list[str], **params):
    """Feed the tokens of each piece one by one; return (deltas per piece, finish, stop reason)."""
    processor = OutputProcessor(tokenizer, SamplingParams(max_tokens=1000, **params), tokenizer.eos_token_ids)
    deltas, count = [], 0
    for piece in text_pieces:
        out = ""
        for token in tokenizer.encode(piece):
            count += 1
            delta, finish, stop = processor.append(token, count, 1000)
            out += delta
            if finish:
                deltas.append(out)
                return deltas, finish, stop
        deltas.append(out)
    return deltas, None, None


def test_possible_stop_prefix_is_held_then_released(smollm):
    tok = smollm.tokenizer
    deltas, finish, _ = feed(tok, ["Hello", " wor", "ld", " again"], stop=["world!"])
    assert finish is None
    # "wor", then "world", could still become "world!": only they wait; the space before them does not
    assert deltas[:3] == ["Hello", " ", ""]
    assert "".join(deltas) == "Hello world again"


def test_stop_string_is_cut_and_reported(smollm):
    tok = smollm.tokenizer
    deltas, finish, stop = feed(tok, ["Hello", " wor", "ld", "! And more"], stop=["world!", "never"])
    assert (finish, stop) == ("stop", "world!")
    assert "".join(deltas) == "Hello "


def test_earliest_of_several_stops_wins(smollm):
    tok = smollm.tokenizer
    deltas, finish, stop = feed(tok, ["one two three four"], stop=["three", "two"])
    assert (finish, stop, "".join(deltas)) == ("stop", "two", "one ")


def test_eos_flushes_held_text(smollm):
    tok = smollm.tokenizer
    processor = OutputProcessor(tok, SamplingParams(max_tokens=100, stop=["Paris!"]), tok.eos_token_ids)
    text = ""
    for i, token in enumerate(tok.encode("It is Par"), 1):
        text += processor.append(token, i, 100)[0]
    assert text == "It is "  # " Par" might begin the stop string
    delta, finish, stop = processor.append(next(iter(tok.eos_token_ids)), 10, 100)
    assert (text + delta, finish, stop) == ("It is Par", "stop", None)
