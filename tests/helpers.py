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

VARIANTS = {
    "pre_sinusoidal": dict(pre_norm=True),
    "post_sinusoidal": dict(pre_norm=False),
    "pre_relative": dict(pre_norm=True, maximum_relative_position=3),
    "post_relative": dict(pre_norm=False, maximum_relative_position=3),
    "shared_embeddings": dict(share_embeddings=True, share_output_embeddings=True),
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
    "VARIANTS",
    "DecoderOnlyLM",
    "Transformer",
    "as_a_user",
    "load_experiment",
    "make",
    "source_batch",
    "with_embedding_offset",
]
