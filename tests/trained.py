"""A small encoder-decoder trained for real (digits -> Russian words), shared by the tests.

Trained once per test process (cached) in about 20-40 s on 2 CPU cores: enough for greedy and beam
search to produce meaningful, mostly correct translations, so tests can compare decoders, exports and
precisions on a model whose distributions are peaked like a real one, not random.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import Transformer, preset
from jaxformer.data.batching import BatchConfig, Buckets, bucket_batches
from jaxformer.data.corpora import number_pairs, split_pairs
from jaxformer.data.tokenizers import CharTokenizer, encode_all
from jaxformer.training.step import TrainConfig, create_train_state, make_train_step

STEPS = 1000
BATCH = 32
OPTIMISED = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


@functools.cache
def trained_number_model():
    """``(model, params, src_tokenizer, tgt_tokenizer, heldout_pairs)``; ids: pad 0, bos 1, eos 2."""
    pairs = number_pairs(4000, max_value=9999, seed=1)
    split = split_pairs(pairs, valid=0.05, test=0.05, seed=1)
    src_tok = CharTokenizer.train(s for s, _ in pairs)
    tgt_tok = CharTokenizer.train(t for _, t in pairs)
    config = preset(
        "tiny",
        vocab_size=tgt_tok.vocab_size,
        src_vocab_size=src_tok.vocab_size,
        d_model=64,
        ffn_dim=128,
        dropout=0.0,
        attention_dropout=0.0,
        ffn_dropout=0.0,
    )
    model = Transformer(config)
    train_config = TrainConfig(learning_rate=2.0, warmup_steps=200, clip_norm=1.0)
    token_pairs = list(
        zip(
            encode_all(src_tok, [s for s, _ in split.train]),
            encode_all(tgt_tok, [t for _, t in split.train]),
            strict=True,
        )
    )
    batch_config = BatchConfig(
        batch_size=BATCH, buckets=Buckets.multiples(16, 64), drop_remainder=True
    )
    state = create_train_state(model, jax.random.key(0), train_config)
    # 600 steps: LLVM's optimisations pay here (tests/conftest.py turns them off for the suite's many
    # small compilations; this program runs 2-2.7x faster with them: 53 -> 36 s for the fixture).
    train_step = jax.jit(
        make_train_step(model, train_config, jit=False),
        donate_argnums=0,
        compiler_options=OPTIMISED,
    )
    step, epoch = 0, 0
    while step < STEPS:
        batches, _ = bucket_batches(token_pairs, batch_config, seed=epoch)
        for b in batches:
            if step == STEPS:
                break
            batch = {k: jnp.asarray(getattr(b, k)) for k in ("src", "tgt_in", "tgt_out")}
            state, _ = train_step(state, batch)
            step += 1
        epoch += 1
    params = jax.tree.map(np.asarray, state.params)
    return model, params, src_tok, tgt_tok, split.test
