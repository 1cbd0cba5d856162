"""bfloat16 activations (``TransformerConfig.dtype``) on the trained smoke model, against float32.

The same float32 parameters run with ``config.replace(dtype="bfloat16")``: embeddings, matmuls,
norms' outputs and the KV cache in bfloat16; attention scores and softmax, logits, losses and search
scores in float32. bfloat16 keeps 8 bits of mantissa (relative error ~4e-3 per operation), so the
two precisions are compared on what a peaked, trained model must preserve: the tokens it picks.
Bounds: greedy / beam outputs identical on >= 95% of held-out rows (all 200 agree today); the float32
argmax in bfloat16's top 2 at every teacher-forced position (it is bfloat16's argmax today); a
sequence log-probability off by at most 0.02 nats per token (0.007 today).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trained import trained_number_model

from jaxformer import Transformer, generate
from jaxformer import decoding as dec
from jaxformer.training.losses import cross_entropy, padding_weights
from jaxformer.training.step import TrainConfig, create_train_state, make_train_step

# The trained model is trained once per test process: its tests share one xdist worker
# (`make test` runs with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("trained_number_model")

MAX_LENGTH = 48
PRECISIONS = ("float32", "bfloat16")


def pad(rows) -> np.ndarray:
    width = max(map(len, rows))
    return np.array([row + [0] * (width - len(row)) for row in rows], np.int32)


@pytest.fixture(scope="session")
def runs():
    """Held-out batch and, per precision: teacher forcing, greedy and beam search outputs."""
    model, params, src_tok, tgt_tok, heldout = trained_number_model()
    src = pad([src_tok.encode(s) for s, _ in heldout])  # [200, S]
    targets = [tgt_tok.encode(t) for _, t in heldout]
    tgt_in, tgt_out = pad([[1, *t] for t in targets]), pad([[*t, 2] for t in targets])
    out = {"params": params, "src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}
    for dtype in PRECISIONS:
        m = Transformer(model.config.replace(dtype=dtype))

        @jax.jit
        def teacher_forcing(params, src, tgt_in, m=m):
            memory, valid = m.apply({"params": params}, src, method=Transformer.encode)
            logits, attention = m.apply(
                {"params": params}, tgt_in, memory, valid, method=Transformer.decode
            )
            cache = m.apply(
                {"params": params}, src.shape[0], MAX_LENGTH, method=Transformer.init_cache
            )
            kv = m.apply({"params": params}, memory, valid, method=Transformer.init_memory)
            return memory, logits, attention, (cache, kv)

        memory, logits, attention, cache = teacher_forcing(params, src, tgt_in)
        decode = dict(start_id=1, end_id=2, max_length=MAX_LENGTH)
        out[dtype] = {
            "model": m,
            "memory": memory,
            "logits": logits,
            "attention": attention,
            "cache": cache,
            "greedy": generate(m, params, src, **decode),
            "beam": generate(
                m, params, src, strategy=dec.BeamSearch(4, 0.6), return_attention=True, **decode
            ),
        }
    return out


def test_bfloat16_computes_in_bfloat16_and_scores_in_float32(runs):
    for dtype in PRECISIONS:
        run = runs[dtype]
        assert run["memory"].dtype == jnp.dtype(dtype)  # the encoder's activations
        cache, kv = run["cache"]
        assert cache.self_attention[0].k.dtype == jnp.dtype(dtype)
        assert kv.kv[0].v.dtype == jnp.dtype(dtype)
        assert run["logits"].dtype == jnp.float32
        assert run["attention"].dtype == jnp.float32  # the softmax probabilities
        for search in ("greedy", "beam"):
            result = run[search]
            assert result.log_probs.dtype == jnp.float32, (dtype, search)
            assert result.scores.dtype == jnp.float32, (dtype, search)
        assert run["beam"].attention.dtype == jnp.float32
        np.testing.assert_allclose(run["beam"].attention.sum(-1)[:, 0, 0], 1.0, rtol=1e-5)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(runs["params"]))


def test_the_float32_argmax_stays_in_bfloat16s_top_2_under_teacher_forcing(runs):
    mask = runs["tgt_out"] != 0  # [B, T]
    assert mask.sum() > 2000
    f32 = np.asarray(runs["float32"]["logits"])  # [B, T, V]
    b16 = np.asarray(runs["bfloat16"]["logits"])
    best = f32.argmax(-1)  # [B, T]
    # Rank of float32's best token among bfloat16's logits: 0 = also bfloat16's best.
    rank = (b16 > np.take_along_axis(b16, best[..., None], -1)).sum(-1)
    assert rank[mask].max() <= 1
    assert (rank[mask] == 0).mean() >= 0.99
    # The reference tokens' log-probabilities move by much less than bfloat16's 8-bit mantissa
    # would allow if errors compounded through the layers.
    gold = lambda logits: np.take_along_axis(
        np.asarray(jax.nn.log_softmax(logits)), runs["tgt_out"][..., None], -1
    )[..., 0]
    assert np.abs(gold(f32) - gold(b16))[mask].max() < 0.3


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_bfloat16_search_picks_the_float32_tokens(runs, search):
    f32, b16 = runs["float32"][search], runs["bfloat16"][search]
    ids32, ids16 = np.asarray(f32.ids[:, 0]), np.asarray(b16.ids[:, 0])  # best hypotheses
    same = (ids32 == ids16).all(-1)
    assert same.mean() >= 0.95
    lengths = np.asarray(f32.lengths[:, 0])
    np.testing.assert_array_equal(np.asarray(b16.lengths[:, 0])[same], lengths[same])
    assert lengths.min() >= 10  # real translations, not empty outputs
    drift = np.abs(np.asarray(f32.log_probs[:, 0]) - np.asarray(b16.log_probs[:, 0]))
    assert np.all(drift[same] <= 0.02 * (lengths[same] + 1))  # per token, EOS included


def test_a_bfloat16_training_step_keeps_float32_params_and_the_float32_loss(runs):
    params = runs["params"]
    batch = {name: jnp.asarray(runs[name][:64]) for name in ("src", "tgt_in", "tgt_out")}
    config = TrainConfig()
    # The float32 model's label-smoothed loss on the same batch, from its teacher-forced logits.
    logits = runs["float32"]["logits"][:64]
    weights = padding_weights(batch["tgt_out"], 0)
    loss_sum, tokens = cross_entropy(logits, batch["tgt_out"], weights, config.label_smoothing)
    model = runs["bfloat16"]["model"]
    state = create_train_state(
        model, jax.random.key(0), config, params=jax.tree.map(jnp.array, params)
    )
    state, metrics = make_train_step(model, config)(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    moments = state.opt_state[0]  # Adam's (count, mu, nu)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((moments.mu, moments.nu)))
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    np.testing.assert_allclose(metrics["loss"], loss_sum / tokens, rtol=0.02)
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.params, params)
    assert 0 < max(jax.tree.leaves(moved)) < 1e-3  # warm-up step 1: a tiny learning rate
