"""Bad input at every entry point gets a clear error naming the parameter and what is allowed.

Static problems are refused before anything is traced or compiled (``generate``'s jit cache does not
grow). Inputs that are odd but legal (an empty source, a batch of padding only) decode to finite
numbers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import (
    DecoderOnlyLM,
    HourglassConfig,
    HourglassLM,
    Transformer,
    TransformerConfig,
    generate,
    hourglass_preset,
    init_params,
    preset,
)
from jaxformer import decoding as dec
from jaxformer.decoding.generation import _run
from jaxformer.training import checkpoint as ckpt

from helpers import as_a_user, source_batch

V = 32  # the tiny preset's vocabulary
MAX_LEN = 16


@pytest.fixture(scope="session")
def seq2seq():
    model = Transformer(preset("tiny", max_len=MAX_LEN))
    return model, init_params(model, jax.random.key(0))


@pytest.fixture(scope="session")
def lm():
    model = DecoderOnlyLM(preset("tiny", max_len=MAX_LEN))
    return model, init_params(model, jax.random.key(0))


@pytest.fixture(scope="session")
def hourglass():
    model = HourglassLM(hourglass_preset("tiny", max_len=MAX_LEN))
    return model, init_params(model, jax.random.key(0))


SRC = np.asarray(source_batch())  # [3, 6], ids in [3, 32), padded with 0
GOOD = dict(start_id=1, end_id=2, max_length=8)

# (what, generate keyword arguments replacing GOOD's, the error's message)
GENERATE_CASES = [
    (
        "beam > V",
        dict(strategy=dec.BeamSearch(V + 1)),
        r"beam_size=33 must be in \[1, vocab_size=32\]",
    ),
    (
        "topk > V greedy",
        dict(sampler=dec.RandomSampler(topk=V + 1)),
        r"topk=33 must be in \[0, 32\]",
    ),
    (
        "topk > W*V beam",
        dict(strategy=dec.BeamSearch(2), sampler=dec.RandomSampler(topk=2 * V + 1)),
        r"topk=65 must be in \[0, 64\]",
    ),
    ("max_length 0", dict(max_length=0), r"max_length must be an int >= 1, got 0"),
    ("max_length < 0", dict(max_length=-3), r"max_length must be an int >= 1, got -3"),
    ("max_length float", dict(max_length=4.0), r"max_length must be an int >= 1, got 4.0"),
    (
        "max_length > max_len",
        dict(max_length=MAX_LEN + 1),
        r"max_length=17 needs 17 positions.*max_len=16",
    ),
    ("min > max", dict(min_length=9), r"min_length must be in \[0, max_length=8\], got 9"),
    ("min < 0", dict(min_length=-1), r"min_length must be in \[0, max_length=8\], got -1"),
    ("min float", dict(min_length=1.5), r"min_length must be an int"),
    ("start_id = V", dict(start_id=V), r"start_id=32 is outside the target vocabulary \[0, 32\)"),
    ("start_id < 0", dict(start_id=-1), r"start_id=-1 is outside the target vocabulary \[0, 32\)"),
    ("start_id str", dict(start_id="1"), r"start_id must be an int in \[0, 32\)"),
    ("start_id None", dict(start_id=None), r"needs start_id"),
    ("end_id = V", dict(end_id=V), r"end_id=32 is outside the target vocabulary \[0, 32\)"),
    ("end_id < 0", dict(end_id=-2), r"end_id=-2 is outside the target vocabulary \[0, 32\)"),
    ("end_id float", dict(end_id=2.0), r"end_id must be an int in \[0, 32\)"),
    ("end ids, one = V", dict(end_id=(2, V)), r"end_id=\(2, 32\) is outside the target vocabulary"),
    ("end ids empty", dict(end_id=()), r"end_id must be an int or a non-empty tuple of distinct"),
    ("end ids repeated", dict(end_id=(2, 2)), r"non-empty tuple of distinct ints, got \(2, 2\)"),
    (
        "end ids in compat",
        dict(end_id=(2, 3), compat="opennmt-tf"),
        r"compat='opennmt-tf' takes one end_id",
    ),
    (
        "source too long",
        dict(inputs=np.ones((2, MAX_LEN + 1), np.int32)),
        r"source of length 17 .*max_len=16",
    ),
    (
        "source id = V",
        dict(inputs=np.full((2, 3), V)),
        r"source ids must be in \[0, 32\).*\[32, 32\]",
    ),
    (
        "source id < 0",
        dict(inputs=np.full((2, 3), -1)),
        r"source ids must be in \[0, 32\).*\[-1, -1\]",
    ),
    (
        "float source",
        dict(inputs=np.ones((2, 3), np.float32)),
        r"integer token ids, got dtype float32",
    ),
    (
        "1-D source",
        dict(inputs=np.ones(3, np.int32)),
        r"inputs must be \[batch >= 1, length >= 0\]",
    ),
    ("empty batch", dict(inputs=np.ones((0, 3), np.int32)), r"inputs must be \[batch >= 1"),
    ("sampler without rng", dict(sampler=dec.RandomSampler(topk=4)), r"RandomSampler needs rng"),
    ("bad compat", dict(compat="opennmt"), r"compat must be one of"),
    ("strategy type", dict(strategy="beam"), r"strategy must be GreedySearch\(\) or BeamSearch"),
]


@pytest.mark.parametrize(
    "kwargs, message", [c[1:] for c in GENERATE_CASES], ids=[c[0] for c in GENERATE_CASES]
)
def test_generate_refuses_bad_arguments_before_compiling(seq2seq, kwargs, message):
    model, params = seq2seq
    kwargs = {"inputs": SRC, **GOOD, **kwargs}
    inputs = kwargs.pop("inputs")
    before = _run._cache_size()
    with pytest.raises((ValueError, TypeError), match=message), as_a_user():
        generate(model, params, inputs, **kwargs)
    assert _run._cache_size() == before  # refused before tracing


LM_CASES = [
    (
        "prompt + max_length > max_len",
        dict(max_length=13),
        r"max_length=13 needs 17 positions.*<= 12",
    ),
    ("empty prompt", dict(inputs=np.ones((2, 0), np.int32)), r"length >= 1\]"),
    ("prompt too long", dict(inputs=np.ones((1, MAX_LEN + 1), np.int32)), r"prompt of length 17"),
    ("prompt id = V", dict(inputs=np.full((1, 2), V)), r"prompt ids must be in \[0, 32\)"),
    ("attention from an LM", dict(return_attention=True), r"no source to return attention"),
    ("end_id = V", dict(end_id=V), r"end_id=32 is outside"),
    ("beam > V", dict(strategy=dec.BeamSearch(V + 1)), r"beam_size=33"),
]


@pytest.mark.parametrize("family", ["decoder_only", "hourglass"])
@pytest.mark.parametrize("kwargs, message", [c[1:] for c in LM_CASES], ids=[c[0] for c in LM_CASES])
def test_language_models_refuse_bad_arguments_before_compiling(
    family, lm, hourglass, kwargs, message
):
    model, params = lm if family == "decoder_only" else hourglass
    kwargs = {"inputs": np.full((2, 5), 3, np.int32), "end_id": 2, "max_length": 4, **kwargs}
    inputs = kwargs.pop("inputs")
    before = _run._cache_size()
    with pytest.raises(ValueError, match=message):
        generate(model, params, inputs, **kwargs)
    assert _run._cache_size() == before


CONSTRUCTOR_CASES = [
    ("beam 0", lambda: dec.BeamSearch(0), r"beam_size must be an int >= 1, got 0"),
    ("beam < 0", lambda: dec.BeamSearch(-2), r"beam_size must be an int >= 1, got -2"),
    ("beam float", lambda: dec.BeamSearch(2.0), r"beam_size must be an int >= 1, got 2.0"),
    ("length penalty < 0", lambda: dec.BeamSearch(2, length_penalty=-0.1), r"length_penalty must be a finite number >= 0"),
    ("length penalty NaN", lambda: dec.BeamSearch(2, length_penalty=math.nan), r"length_penalty must be a finite number >= 0"),
    ("length penalty inf", lambda: dec.BeamSearch(2, length_penalty=math.inf), r"length_penalty must be a finite number >= 0, got inf"),
    ("coverage < 0", lambda: dec.BeamSearch(2, coverage_penalty=-1.0), r"coverage_penalty must be a finite number >= 0"),
    ("coverage inf", lambda: dec.BeamSearch(2, coverage_penalty=math.inf), r"coverage_penalty must be a finite number >= 0, got inf"),
    ("n-best > beam", lambda: dec.BeamSearch(2, num_hypotheses=3), r"num_hypotheses must be in \[1, beam_size\]"),
    ("topk < 0", lambda: dec.RandomSampler(topk=-1), r"topk must be an int >= 0 \(0 = all\), got -1"),
    ("topk float", lambda: dec.RandomSampler(topk=2.5), r"topk must be an int >= 0"),
    ("temperature 0", lambda: dec.RandomSampler(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
    ("temperature < 0", lambda: dec.RandomSampler(temperature=-1.0), r"temperature must be a finite number > 0"),
    ("temperature NaN", lambda: dec.RandomSampler(temperature=math.nan), r"temperature must be a finite number > 0"),
    ("temperature inf", lambda: dec.RandomSampler(temperature=math.inf), r"temperature must be a finite number > 0, got inf"),
    ("top_p 0", lambda: dec.RandomSampler(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    ("top_p > 1", lambda: dec.RandomSampler(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    # Configurations that cannot work (test_model_properties / test_hourglass hold more).
    ("heads do not divide D", lambda: TransformerConfig(d_model=32, num_heads=5), r"num_heads \(5\) must divide d_model \(32\)"),
    ("no heads", lambda: TransformerConfig(num_heads=0), r"num_heads must be >= 1"),
    ("vocab 1", lambda: TransformerConfig(vocab_size=1), r"vocab_size must be >= 2"),
    ("max_len 0", lambda: TransformerConfig(max_len=0), r"max_len must be >= 1"),
    ("dtype", lambda: TransformerConfig(dtype="int8"), r"unknown dtype 'int8'"),
    ("odd D sinusoids", lambda: TransformerConfig(d_model=33, num_heads=3), r"even d_model"),
    ("dropout NaN", lambda: TransformerConfig(dropout=math.nan), r"dropout must be in \[0, 1\)"),
    ("norm", lambda: TransformerConfig(norm="batch"), r"norm must be one of \['layer', 'rms', 'gemma_rms'\], got 'batch'"),
    ("layer norm epsilon 0", lambda: TransformerConfig(layer_norm_epsilon=0.0), r"layer_norm_epsilon must be a number in \(0, 1\), got 0.0"),
    ("activation", lambda: TransformerConfig(activation="tanh"), r"activation must be one of \['relu', 'gelu', .*'swiglu'\], got 'tanh'"),
    ("positions", lambda: TransformerConfig(positions="alibi"), r"positions must be one of \[None, 'sinusoidal', 'learned', 'none', 'rotary'\], got 'alibi'"),
    ("position layout", lambda: TransformerConfig(position_layout="split"), r"position_layout must be one of \['interleaved', 'concat'\]"),
    ("rate denominator", lambda: TransformerConfig(position_rate_denominator="D"), r"position_rate_denominator must be one of \['D/2', 'D/2-1'\], got 'D'"),
    ("D/2-1 with D 2", lambda: TransformerConfig(d_model=2, num_heads=1, position_rate_denominator="D/2-1"), r"position_rate_denominator 'D/2-1' needs d_model >= 4"),
    ("position offset < 0", lambda: TransformerConfig(position_offset=-1), r"position_offset must be an int >= 0, got -1"),
    ("embedding scale 0", lambda: TransformerConfig(embedding_scale=0.0), r"embedding_scale must be None \(sqrt\(d_model\)\) or a number > 0, got 0.0"),
    ("embedding norm str", lambda: TransformerConfig(embedding_norm="yes"), r"embedding_norm must be True or False, got 'yes'"),
    ("final norm int", lambda: TransformerConfig(final_norm=1), r"final_norm must be None, True or False, got 1"),
    ("output bias str", lambda: TransformerConfig(output_bias="tied"), r"output_bias must be None, True or False"),
    ("tied scale untied", lambda: TransformerConfig(tied_output_scale=True), r"tied_output_scale needs share_output_embeddings=True"),
    ("head dim 0", lambda: TransformerConfig(attention_head_dim=0), r"attention_head_dim must be None \(d_model // num_heads\) or an int >= 1, got 0"),
    ("query scaling None", lambda: TransformerConfig(query_scaling=None), r"query_scaling must be True or False, got None"),
    ("ffn bias int", lambda: TransformerConfig(ffn_bias=0), r"ffn_bias must be True or False, got 0"),
    ("T5 buckets 2", lambda: TransformerConfig(relative_attention_num_buckets=2), r"relative_attention_num_buckets must be 0 \(off\) or an int >= 4, got 2"),
    ("T5 max distance", lambda: TransformerConfig(relative_attention_num_buckets=32, relative_attention_max_distance=16), r"relative_attention_max_distance must be an int > relative_attention_num_buckets // 2 \(16\), got 16"),
    ("T5 and Shaw", lambda: TransformerConfig(relative_attention_num_buckets=32, maximum_relative_position=4), r"relative_attention_num_buckets \(T5\) and maximum_relative_position \(Shaw\) exclude each other"),
    ("hourglass heads", lambda: HourglassConfig(d_model=32, num_heads=3), r"HourglassConfig: num_heads \(3\)"),
    ("factor 2 then 3", lambda: HourglassConfig(hierarchy="1@1 1@2 1@3 1@2 1@1"), r"factor 3 must be .*divisible by 2"),
    ("factor 4 then 6", lambda: HourglassConfig(hierarchy="1@1 1@4 1@6 1@4 1@1"), r"factor 6 must be .*divisible by 4"),
]  # fmt: skip


@pytest.mark.parametrize(
    "build, message", [c[1:] for c in CONSTRUCTOR_CASES], ids=[c[0] for c in CONSTRUCTOR_CASES]
)
def test_strategies_samplers_and_configs_refuse_impossible_values(build, message):
    with pytest.raises(ValueError, match=message), as_a_user():
        build()


def test_attention_size_that_does_not_match_the_source_is_refused(seq2seq):
    model, params = seq2seq
    memory, valid = model.apply({"params": params}, jnp.asarray(SRC), method=Transformer.encode)
    cache = model.apply({"params": params}, 3, 8, method=Transformer.init_cache)
    kv = model.apply({"params": params}, memory, valid, method=Transformer.init_memory)
    step_fn = dec.step_function(dec.adapter_for(model), params)
    start = jnp.ones([3], jnp.int32)
    for kwargs in (
        dict(return_attention=True, attention_size=7),
        dict(strategy=dec.BeamSearch(2, coverage_penalty=0.2), attention_size=5),
    ):
        with pytest.raises(ValueError, match=r"attention_size=\d does not match .* width 6"):
            dec.dynamic_decode(step_fn, start, 2, cache, max_length=8, shared=kv, **kwargs)


CHECKPOINT_CASES = [
    ("more heads", dict(num_heads=8), r"qkv/kernel: checkpoint has shape \(32, 3, 4, 8\).*expected \(32, 3, 8, 4\)"),
    ("larger vocab", dict(vocab_size=40), r"output/bias: checkpoint has shape \(32,\)"),
    ("relative positions", dict(maximum_relative_position=4), r"missing in checkpoint: .*relative_keys"),
    ("no final norm", dict(pre_norm=False), r"unexpected in checkpoint: .*final_norm"),
]  # fmt: skip


@pytest.fixture(scope="session")
def saved_params(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "run"
    model = Transformer(preset("tiny"))
    manager = ckpt.make_manager(directory, best_metric=None)
    ckpt.save(manager, 1, {"params": init_params(model, jax.random.key(0))})
    manager.close()
    return directory


@pytest.mark.parametrize(
    "overrides, message", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_a_checkpoint_that_does_not_match_the_config_is_refused(saved_params, overrides, message):
    other = Transformer(preset("tiny", **overrides))
    abstract = jax.eval_shape(lambda: init_params(other, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"step 1 does not match the expected parameters(.|\n)*"):
        ckpt.restore_params(saved_params, abstract)
    with pytest.raises(ValueError, match=message):
        ckpt.restore_params(saved_params, abstract)


# Odd but legal inputs ------------------------------------------------------------------------


def assert_all_finite(result):
    for name in ("log_probs", "scores", "attention"):
        value = getattr(result, name)
        if value is not None:
            assert np.isfinite(np.asarray(value)).all(), name
    ids = np.asarray(result.ids)
    assert ((ids >= 0) & (ids < V)).all()


@pytest.mark.parametrize(
    "strategy", [dec.GreedySearch(), dec.BeamSearch(3, length_penalty=0.6, coverage_penalty=0.4)]
)
def test_empty_sources_and_all_padding_batches_decode_to_finite_numbers(seq2seq, strategy):
    model, params = seq2seq
    mixed = SRC.copy()
    mixed[1] = 0  # one empty source in a batch of real ones
    kwargs = dict(start_id=1, end_id=2, max_length=6, strategy=strategy, return_attention=True)
    for src in (mixed, np.zeros_like(SRC), np.zeros((3, 0), np.int32)):
        result = generate(model, params, src, **kwargs)
        assert_all_finite(result)
        empty = ~(src != 0).any(axis=1)
        # Nothing to attend to: the attention of an empty source is exactly zero.
        np.testing.assert_array_equal(np.asarray(result.attention)[empty], 0.0)
    # The empty row does not disturb its neighbours: they decode as they do without it.
    alone = generate(model, params, SRC[[0, 2]], **kwargs)
    together = generate(model, params, mixed, **kwargs)
    np.testing.assert_array_equal(np.asarray(together.ids)[[0, 2]], alone.ids)
    np.testing.assert_allclose(np.asarray(together.log_probs)[[0, 2]], alone.log_probs, atol=1e-5)


def test_a_prompt_of_padding_decodes_to_finite_numbers(lm):
    model, params = lm
    result = generate(model, params, np.zeros((2, 3), np.int32), end_id=2, max_length=5)
    assert_all_finite(result)
