"""Small shared fixtures for the model tests."""

import contextlib
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxtyping

from jaxformer import DecoderOnlyLM, Transformer, init_params, preset
from jaxformer.models.layers import TokenEmbedding
from jaxformer.models.rotary import RopeScaling

VARIANTS = {
    "pre_sinusoidal": dict(pre_norm=True),
    "post_sinusoidal": dict(pre_norm=False),
    "pre_relative": dict(pre_norm=True, maximum_relative_position=3),
    "post_relative": dict(pre_norm=False, maximum_relative_position=3),
    "shared_embeddings": dict(share_embeddings=True, share_output_embeddings=True),
}

# The model options of other implementations (TransformerConfig's fields after ``dtype``), combined as
# those models use them; tests/models/test_model_options.py runs the property tests on each.
OPENNMT_TF_SINUSOIDS = dict(
    positions="sinusoidal",
    position_layout="concat",
    position_rate_denominator="D/2-1",
    position_offset=1,
)
OPTION_VARIANTS = {
    "opennmt_tf": dict(
        layer_norm_epsilon=1e-3,
        share_output_embeddings=True,
        output_bias=True,
        **OPENNMT_TF_SINUSOIDS,
    ),
    "opennmt_tf_post_relative_and_sinusoids": dict(
        layer_norm_epsilon=1e-3, pre_norm=False, maximum_relative_position=3, **OPENNMT_TF_SINUSOIDS
    ),
    "t5_like": dict(
        norm="rms",
        activation="gated-gelu_tanh",
        positions="none",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=6,
        embedding_scale=1.0,
        attention_head_dim=6,
        query_scaling=False,
        attention_bias=False,
        ffn_bias=False,
        share_embeddings=True,
        share_output_embeddings=True,
        tied_output_scale=True,
    ),
    "bart_like": dict(
        pre_norm=False,
        layer_norm_epsilon=1e-5,
        activation="gelu",
        positions="learned",
        position_offset=2,
        embedding_scale=1.0,
        embedding_norm=True,
        final_logits_bias=True,
        share_embeddings=True,
        share_output_embeddings=True,
    ),
    "marian_like": dict(
        pre_norm=False, activation="swish", position_layout="concat", final_logits_bias=True
    ),
    "m2m100_like": dict(
        position_layout="concat", position_rate_denominator="D/2-1", position_offset=2
    ),
    "swiglu_post_norm_with_final_norm": dict(
        activation="swiglu", pre_norm=False, final_norm=True, embedding_scale=2.0
    ),
    "geglu_pre_norm_without_final_norm": dict(activation="geglu", final_norm=False),
    "gelu_tanh_no_positions": dict(activation="gelu_tanh", positions="none"),
}


# Decoder-only checkpoints' families in miniature (the ``tiny`` preset: D 32, N 4, 2 layers), with
# the options their Hugging Face configs set; tests/decoding/test_lm_options.py runs the property tests and an
# independent NumPy forward pass on each.
LM_VARIANTS = {
    "gpt2_like": dict(
        positions="learned",
        layer_norm_epsilon=1e-5,
        activation="gelu_tanh",
        embedding_scale=1.0,
        share_output_embeddings=True,
    ),
    "llama_like": dict(
        positions="rotary",
        rope_scaling=RopeScaling(
            "llama3",
            4.0,
            low_freq_factor=1.0,
            high_freq_factor=8.0,
            original_max_position_embeddings=64,
        ),  # at H = 8: one frequency kept, one blended, two divided
        norm="rms",
        layer_norm_epsilon=1e-5,
        activation="swiglu",
        attention_bias=False,
        ffn_bias=False,
        embedding_scale=1.0,
        num_kv_heads=2,
    ),
    "mistral_like": dict(
        positions="rotary",
        norm="rms",
        activation="swiglu",
        attention_bias=False,
        ffn_bias=False,
        embedding_scale=1.0,
        num_kv_heads=1,
        sliding_window=3,
    ),
    "qwen2_like": dict(
        positions="rotary",
        rope_theta=1e6,
        rope_scaling=RopeScaling("linear", 2.0),
        norm="rms",
        activation="swiglu",
        attention_out_bias=False,  # biases on q, k, v only
        ffn_bias=False,
        embedding_scale=1.0,
        num_kv_heads=2,
        share_output_embeddings=True,
    ),
    "gemma_like": dict(
        positions="rotary",
        norm="gemma_rms",
        activation="gated-gelu_tanh",
        attention_bias=False,
        ffn_bias=False,
        attention_head_dim=6,  # N*H = 24, not D
        num_kv_heads=1,
        share_output_embeddings=True,  # embedding_scale None: sqrt(D), as Gemma
    ),
}


def make(model_cls, seed=0, **overrides):
    model = model_cls(preset("tiny", **overrides))
    return model, init_params(model, jax.random.key(seed))


def source_batch(seed=1, batch=3, length=6, vocab=32, pad_lengths=(6, 4, 2)):
    ids = jax.random.randint(jax.random.key(seed), (batch, length), 3, vocab)
    lengths = jnp.asarray(pad_lengths)[:, None]
    return jnp.where(jnp.arange(length)[None] < lengths, ids, 0)


def with_embedding_offset(fn, delta, module_name):
    """Run ``fn`` with ``delta`` added to the output of the TokenEmbedding called ``module_name``."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (
            isinstance(context.module, TokenEmbedding)
            and context.method_name == "__call__"
            and context.module.name == module_name
        ):
            out = out + delta
        return out

    with nn.intercept_methods(interceptor):
        return fn()


@contextlib.contextmanager
def as_a_user():
    """Call jaxformer as a user does: without the test-only annotation checker.

    ``make test`` checks every annotation in ``jaxformer`` (jaxtyping + beartype). A value of the wrong
    type (``max_length=4.0``) is then refused by that checker before the library's own validation runs;
    tests of the message a user gets run their call inside this context.
    """
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"


def load_experiment(name: str):
    """Import ``experiments/NAME.py`` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


__all__ = [
    "EXPERIMENTS",
    "LM_VARIANTS",
    "OPTION_VARIANTS",
    "VARIANTS",
    "DecoderOnlyLM",
    "Transformer",
    "as_a_user",
    "load_experiment",
    "make",
    "source_batch",
    "with_embedding_offset",
]
