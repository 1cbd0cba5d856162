"""int8 products (``TransformerConfig(quantization="int8")``) on the trained smoke model.

The same float32 parameters decode the 200 held-out lines through ``translate_texts`` (batches of 100
lines, so every product has at least 16 rows and runs in int8). Issue 17's bound: BLEU within 0.5 of
float32's; the figures print with ``pytest -s``. Bounds on the tokens as for bfloat16
(``test_mixed_precision.py``): the same best hypothesis on >= 95% of lines.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from trained import trained_number_model

from jaxformer import Transformer
from jaxformer.decoding.texts import DecodeOptions, corpus_scores, translate_texts

pytestmark = pytest.mark.xdist_group("trained_number_model")  # trained once per worker


def test_int8_moves_the_logits_but_not_their_argmax():
    """The int8 path runs (the logits move) and keeps the tokens (teacher forcing, 64 lines)."""
    model, params, src_tok, tgt_tok, heldout = trained_number_model()
    pad = lambda rows: np.array([r + [0] * (max(map(len, rows)) - len(r)) for r in rows], np.int32)
    src = pad([src_tok.encode(s) for s, _ in heldout[:64]])
    targets = [tgt_tok.encode(t) for _, t in heldout[:64]]
    tgt_in, tgt_out = pad([[1, *t] for t in targets]), pad([[*t, 2] for t in targets])
    logits = {
        q: np.asarray(
            Transformer(dataclasses.replace(model.config, quantization=q)).apply(
                {"params": params}, jnp.asarray(src), jnp.asarray(tgt_in)
            )
        )
        for q in (None, "int8")
    }
    mask = tgt_out != 0
    moved = np.abs(logits["int8"] - logits[None]).max(-1)[mask]
    assert moved.min() > 0  # every position went through int8 products
    assert (logits["int8"].argmax(-1) == logits[None].argmax(-1))[mask].mean() >= 0.99


@pytest.fixture(scope="module")
def outputs():
    model, params, src_tok, tgt_tok, heldout = trained_number_model()
    sources, references = [s for s, _ in heldout], [t for _, t in heldout]
    found = {}
    for quantization in (None, "int8"):
        m = Transformer(dataclasses.replace(model.config, quantization=quantization))
        for beam in (1, 4):
            options = DecodeOptions(beam_size=beam, length_penalty=0.6 * (beam > 1), max_length=48)
            texts = translate_texts(m, params, src_tok, tgt_tok, sources, options, batch_size=100)
            found[quantization, beam] = [o.texts[0] for o in texts]
    return found, references


@pytest.mark.parametrize("beam", [1, 4])
def test_int8_keeps_bleu_within_half_a_point_of_float32(outputs, beam):
    found, references = outputs
    f32 = corpus_scores(found[None, beam], references)
    int8 = corpus_scores(found["int8", beam], references)
    same = np.mean([a == b for a, b in zip(found[None, beam], found["int8", beam], strict=True)])
    print(f"beam {beam}: float32 {f32}, int8 {int8}, same output on {100 * same:.1f}% of lines")
    assert f32["bleu"] > 50  # a trained model: the comparison means something
    assert abs(int8["bleu"] - f32["bleu"]) <= 0.5
    assert same >= 0.95
