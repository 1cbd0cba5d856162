"""Stop strings: the automaton against brute force, and hypotheses that end at the first match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding as dec
from jaxformer.data.tokenizers import ByteTokenizer, CharTokenizer
from jaxformer.decoding.stop import check_stop, cut_at_stop, stop_table


def _first_stop_brute_force(tokens, token_bytes, strings):
    """The index of the first token after which the concatenated bytes contain a stop string
    that they did not contain before it (None if never)."""
    text = b""
    for i, t in enumerate(tokens):
        text += token_bytes[t]
        if any(s.encode() in text for s in strings):
            return i
    return None


@pytest.mark.parametrize("seed", range(6))
def test_the_automaton_finds_what_brute_force_finds(seed):
    rng = np.random.default_rng(seed)
    alphabet = "abc\u00e9"  # é: two UTF-8 bytes, split across tokens below
    pieces = ["".join(rng.choice(list(alphabet), rng.integers(1, 4))) for _ in range(12)]
    token_bytes = [b"", *(p.encode() for p in pieces)]
    token_bytes += [b"\xc3", b"\xa9"]  # half characters, as byte-level BPE has them
    strings = ["".join(rng.choice(list(alphabet), rng.integers(1, 4))) for _ in range(3)]
    table = stop_table(token_bytes, strings)
    transition, hit = np.asarray(table.transition), np.asarray(table.hit)
    for _ in range(60):
        tokens = rng.integers(0, len(token_bytes), 10).tolist()
        state, first = 0, None
        for i, t in enumerate(tokens):
            if hit[state, t]:
                first = i
                break
            state = transition[state, t]
        assert first == _first_stop_brute_force(tokens, token_bytes, strings), (tokens, strings)


def test_ids_past_the_tokenizer_read_nothing():
    table = stop_table([b"", b"ab"], ["b"], vocab_size=4)
    assert np.asarray(table.hit)[0].tolist() == [False, True, False, False]
    assert (np.asarray(table.transition)[:, 2:] == np.arange(2)[:, None]).all()  # state kept
    with pytest.raises(ValueError, match="smaller than the 2 tokens"):
        stop_table([b"", b"ab"], ["b"], vocab_size=1)


def test_cut_and_refusals():
    assert cut_at_stop("hello. world. x", [". ", "wor"]) == ("hello", True)
    assert cut_at_stop("hello", ["x"]) == ("hello", False)
    for bad in ("\n", [""], [3], "x"):
        with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
            check_stop(bad)


# A byte "model" that spells a fixed text, one byte a step: ids are bytes + 4 (ByteTokenizer).
TEXT = b"one two. three. four"
V = ByteTokenizer().vocab_size


def _spell(ids, step, state):
    byte = jnp.asarray(np.frombuffer(TEXT, np.uint8))[jnp.minimum(step, len(TEXT) - 1)] + 4
    return jnp.broadcast_to(jax.nn.one_hot(byte, V) * 9.0, (ids.shape[0], V)), state


@pytest.mark.parametrize("strategy", [dec.GreedySearch(), dec.BeamSearch(2)])
def test_a_hypothesis_ends_at_the_first_match(strategy):
    tokenizer = ByteTokenizer()
    table = stop_table(tokenizer.token_bytes(), [". ", "our"])
    out = dec.dynamic_decode(
        _spell, jnp.array([1, 1]), 2, strategy=strategy, max_length=len(TEXT), stop=table
    )
    best = np.asarray(out.ids[0, 0, : out.lengths[0, 0]])
    assert tokenizer.decode(best) == "one two. "  # ends with the token completing ". "
    assert out.ids[0, 0, out.lengths[0, 0]] == 2  # then the end token
    plain = dec.dynamic_decode(_spell, jnp.array([1]), 2, strategy=strategy, max_length=len(TEXT))
    assert tokenizer.decode(np.asarray(plain.ids[0, 0])) == TEXT.decode()


def test_stop_strings_through_text_decoding():
    """``DecodeOptions(stop=...)``: the text stops before the match; the tokenizers give bytes."""
    from jaxformer.decoding.texts import DecodeOptions, _output

    tokenizer = CharTokenizer.train("one two. three")
    assert b"".join(tokenizer.token_bytes()[4:]) == "".join(tokenizer.chars).encode()
    ids = np.asarray([tokenizer.encode("one two. three")])[:, None, :]  # [1, 1, T]
    options = DecodeOptions(max_length=14, stop=[". "])
    output = _output((ids, np.array([[14]]), np.zeros((1, 1))), 0, tokenizer, options, ())
    assert output.texts == ["one two"] and not output.truncated  # stopped, not cut by the limit


@pytest.mark.parametrize(
    "fixture", ["hf_lm/gpt2", "hf_lm/mistral", "hf_lm/gemma", "hf/t5", "hf/bart", "hf/marian"]
)
def test_imported_tokenizers_give_the_bytes_they_decode_to(fixture):
    """Byte-level BPE, sentencepiece pieces with byte fallback, Marian's vocabulary: a text's
    tokens' bytes, joined, are its decoded text (up to the space a decoder drops at the start)."""
    import json
    from pathlib import Path

    import jaxformer

    directory = Path(__file__).parents[1] / "data" / fixture
    tokenizer = jaxformer.load_pretrained(directory).target_tokenizer
    table = tokenizer.token_bytes()
    goldens = json.loads((directory / "goldens.json").read_text())
    texts = [c["text"] for c in goldens.get("tokenizer_cases", [])] or goldens["targets"]
    texts += ["caf\u00e9 na\u00efve \u2014 ok", "emoji \U0001f600!"]
    for text in texts:
        ids = tokenizer.encode(text)
        joined = b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
        assert joined.strip() == tokenizer.decode(ids).strip(), (text, ids)
