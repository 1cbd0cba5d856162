"""CTranslate2 export: CTranslate2 decodes the exported model to the same tokens as jaxformer.

CTranslate2 is an independent implementation of the Transformer and of greedy and beam search, so
agreement token for token (and of the scores up to float32 rounding) checks the export, the weight
layout and jaxformer's decoder at once. Random models are made peaked (output layer scaled up) so that
near-ties, which two float32 implementations may break differently, are unlikely.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import Transformer, generate, init_params, preset
from jaxformer.decoding import BeamSearch, GreedySearch
from jaxformer.interop import SPECIAL_TOKENS, ids_vocab, to_ctranslate2

from helpers import as_a_user

ctranslate2 = pytest.importorskip(
    "ctranslate2",
    reason="CTranslate2 is not installed (pip install -e '.[ctranslate2]' from the repository root, or pip install ctranslate2)",
)

# The trained model is trained once per test process: its tests share one xdist worker
# (`make test` runs with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("trained_number_model")

BOS, EOS = 1, 2
MAX_LENGTH = 16
VOCAB = 40
SCORE_ATOL = 2e-3  # summed float32 log-probs of two implementations over <= 17 steps

VARIANTS = {
    f"{norm}-{positions}-{embeddings}": dict(
        pre_norm=norm == "pre",
        maximum_relative_position=3 if positions == "relative" else 0,
        share_embeddings=embeddings == "shared",
        share_output_embeddings=embeddings == "shared",
    )
    for norm, positions, embeddings in itertools.product(
        ("pre", "post"), ("sinusoidal", "relative"), ("shared", "separate")
    )
}


@functools.cache
def _superset_params():
    """Random parameters with every optional part (relative tables, separate embeddings, output)."""
    config = preset("tiny", vocab_size=VOCAB, maximum_relative_position=3)
    return jax.jit(init_params, static_argnums=0)(Transformer(config), jax.random.key(0))


def random_model(**overrides):
    """A tiny random Transformer whose output distributions are peaked (logits scaled by 4).

    One random initialisation serves every variant (``init_params`` is slow to trace): parts that a
    variant does not have are dropped, so the variants differ only in their wiring.
    """
    config = preset("tiny", vocab_size=VOCAB, **overrides)
    params = jax.tree.map(lambda x: x, _superset_params())  # fresh dicts: the cache stays intact
    if config.share_embeddings:
        del params["source_embedding"]
    if config.share_output_embeddings:
        del params["output"]
    if not config.relative:
        for stack in ("encoder", "decoder"):
            for layer in params[stack].values():
                for name in ("relative_keys", "relative_values"):
                    layer.get("self_attention", {}).pop(name, None)
    if config.source_vocab_size != VOCAB:
        table = params["source_embedding"]["embedding"]
        params["source_embedding"] = {"embedding": table[: config.source_vocab_size]}
    output = "target_embedding" if config.share_output_embeddings else "output"
    params[output] = jax.tree.map(lambda x: 4.0 * x, params[output])
    return config, params


def source_batch(seed=1, lengths=(7, 5, 3, 6)):
    ids = np.array(jax.random.randint(jax.random.key(seed), (len(lengths), max(lengths)), 4, VOCAB))
    for row, length in enumerate(lengths):
        ids[row, length:] = 0
    return ids


def to_tokens(ids, vocab):
    return [[vocab[i] for i in row if i != 0] for row in np.asarray(ids)]


def jax_best(config, params, src, beam_size, max_length=MAX_LENGTH):
    """(token id lists, cumulative log-probs) of the best hypothesis of each batch entry."""
    strategy = GreedySearch() if beam_size == 1 else BeamSearch(beam_size)
    result = generate(
        Transformer(config),
        params,
        src,
        start_id=BOS,
        end_id=EOS,
        max_length=max_length,
        strategy=strategy,
    )
    ids, lengths = np.asarray(result.ids[:, 0]), np.asarray(result.lengths[:, 0])
    return [list(map(int, row[:n])) for row, n in zip(ids, lengths, strict=True)], np.asarray(
        result.log_probs[:, 0]
    )


def ct2_best(translator, src_tokens, vocab, beam_size, max_length=MAX_LENGTH):
    index = {token: i for i, token in enumerate(vocab)}
    results = translator.translate_batch(
        src_tokens,
        beam_size=beam_size,
        length_penalty=0.0,  # jaxformer's default: rank by the cumulative log-prob
        max_decoding_length=max_length,
        min_decoding_length=0,  # CTranslate2's default (1) renormalises step 0 without EOS
        return_scores=True,
    )
    ids = [[index[t] for t in r.hypotheses[0]] for r in results]
    return ids, np.asarray([r.scores[0] for r in results], np.float32)


def compare(config, params, src, src_vocab, tgt_vocab, tmp_path, beams=(1, 4), **decode):
    out = to_ctranslate2(
        config, params, tmp_path / "ct2", source_vocab=src_vocab, target_vocab=tgt_vocab
    )
    translator = ctranslate2.Translator(str(out), device="cpu", intra_threads=1)
    src_tokens = to_tokens(src, src_vocab)
    differences = {}
    for beam in beams:
        ours, our_scores = jax_best(config, params, src, beam, **decode)
        theirs, their_scores = ct2_best(translator, src_tokens, tgt_vocab, beam, **decode)
        assert ours == theirs, f"beam {beam}: jaxformer {ours} != CTranslate2 {theirs}"
        np.testing.assert_allclose(our_scores, their_scores, atol=SCORE_ATOL, rtol=0)
        differences[beam] = float(np.max(np.abs(our_scores - their_scores)))
    return differences


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ctranslate2_equals_jaxformer_on_random_weights(variant, tmp_path):
    config, params = random_model(**VARIANTS[variant])
    vocab = ids_vocab(VOCAB)
    differences = compare(config, params, source_batch(), vocab, vocab, tmp_path)
    print(f"{variant}: max |score difference| by beam size {differences}")


def test_ctranslate2_equals_jaxformer_on_the_trained_model(tmp_path):
    from trained import trained_number_model

    model, params, src_tok, tgt_tok, heldout = trained_number_model()
    pairs = heldout[:24]
    encoded = [src_tok.encode(s) for s, _ in pairs]
    width = max(map(len, encoded))
    src = np.array([ids + [0] * (width - len(ids)) for ids in encoded], np.int32)
    src_vocab = [*SPECIAL_TOKENS, *src_tok.chars]
    tgt_vocab = [*SPECIAL_TOKENS, *tgt_tok.chars]
    differences = compare(model.config, params, src, src_vocab, tgt_vocab, tmp_path, max_length=64)
    print(f"trained model: max |score difference| by beam size {differences}")
    # The hypotheses end with EOS well before max_length: the export covers the end of a search.
    ours, _ = jax_best(model.config, params, src, 4, max_length=64)
    assert max(map(len, ours)) < 63 and min(map(len, ours)) > 0


def test_int8_export_loads_and_translates(tmp_path):
    config, params = random_model(**VARIANTS["pre-sinusoidal-separate"])
    vocab = ids_vocab(VOCAB)
    out = to_ctranslate2(
        config,
        params,
        tmp_path / "int8",
        source_vocab=vocab,
        target_vocab=vocab,
        quantization="int8",
    )
    assert (out / "model.bin").stat().st_size < (
        to_ctranslate2(config, params, tmp_path / "f32", source_vocab=vocab, target_vocab=vocab)
        / "model.bin"
    ).stat().st_size
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type="int8")
    ids, _ = ct2_best(translator, to_tokens(source_batch(), vocab), vocab, 1)
    assert len(ids) == 4 and all(0 < len(row) <= MAX_LENGTH for row in ids)


def test_separate_vocabularies_are_written_and_the_shared_one_once(tmp_path):
    config, params = random_model(src_vocab_size=30)
    src_vocab, tgt_vocab = ids_vocab(30), [*SPECIAL_TOKENS, *(f"t{i}" for i in range(4, VOCAB))]
    out = to_ctranslate2(
        config, params, tmp_path / "a", source_vocab=src_vocab, target_vocab=tgt_vocab
    )
    assert {p.name for p in out.iterdir()} >= {"source_vocabulary.json", "target_vocabulary.json"}
    config, params = random_model()
    out = to_ctranslate2(
        config, params, tmp_path / "b", source_vocab=tgt_vocab, target_vocab=tgt_vocab
    )
    assert (out / "shared_vocabulary.json").exists()


def test_ids_vocab():
    vocab = ids_vocab(7)
    assert vocab == ["<blank>", "<s>", "</s>", "<unk>", "4", "5", "6"]
    with pytest.raises(ValueError, match="size"):
        ids_vocab(3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(source_vocab=ids_vocab(VOCAB - 1)), ValueError, "source_vocab has 39 tokens"),
        (dict(target_vocab=ids_vocab(VOCAB + 1)), ValueError, "target_vocab has 41 tokens"),
        (dict(target_vocab=["a"] * VOCAB), ValueError, "target_vocab has duplicate"),
        (dict(source_vocab="abc"), TypeError, "source_vocab must be a list"),
        (dict(quantization="int3"), ValueError, "quantization must be one of"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, error, match, tmp_path):
    config, params = random_model()
    args = dict(source_vocab=ids_vocab(VOCAB), target_vocab=ids_vocab(VOCAB)) | kwargs
    with pytest.raises(error, match=match), as_a_user():
        to_ctranslate2(config, params, tmp_path / "x", **args)


def test_params_of_another_model_are_rejected(tmp_path):
    config, _ = random_model()
    with pytest.raises(ValueError, match="params has no 'encoder'"):
        to_ctranslate2(
            config, {"w": jnp.zeros(3)}, tmp_path, source_vocab=ids_vocab(VOCAB),
            target_vocab=ids_vocab(VOCAB),
        )  # fmt: skip
