import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.models.attention import MultiHeadAttention, dot_product_attention


def numpy_attention(q, k, v, mask):
    """Textbook attention per batch entry and head, written with NumPy loops."""
    b_, t_, n_, h_ = q.shape
    out = np.zeros_like(q)
    for b in range(b_):
        for n in range(n_):
            scores = q[b, :, n] @ k[b, :, n].T / np.sqrt(h_)  # [T, S]
            scores = np.where(mask[b], scores, -np.inf)
            for t in range(t_):
                if not mask[b, t].any():
                    continue  # fully masked: zero output
                w = np.exp(scores[t] - scores[t].max())
                out[b, t, n] = (w / w.sum()) @ v[b, :, n]
    return out


def test_dot_product_attention_matches_textbook(key):
    kq, kk, kv, km = jax.random.split(key, 4)
    q = jax.random.normal(kq, (2, 3, 4, 8))
    k = jax.random.normal(kk, (2, 5, 4, 8))
    v = jax.random.normal(kv, (2, 5, 4, 8))
    mask = np.array(jax.random.bernoulli(km, 0.7, (2, 3, 5)))
    mask[1, 2] = False  # one fully masked query row
    out, probs = dot_product_attention(q, k, v, jnp.asarray(mask)[:, None])
    np.testing.assert_allclose(out, numpy_attention(*map(np.asarray, (q, k, v)), mask), atol=1e-5)
    # Masked keys get exactly zero weight; a fully masked row is all zeros and gives a zero output.
    assert np.all(np.asarray(probs)[np.broadcast_to(~mask[:, None], probs.shape)] == 0.0)
    np.testing.assert_array_equal(probs[1, :, 2], 0.0)
    np.testing.assert_array_equal(out[1, 2], 0.0)
    assert np.isfinite(np.asarray(out)).all()


def test_fully_masked_rows_have_finite_gradients(key):
    q = k = v = jax.random.normal(key, (1, 2, 2, 4))
    mask = jnp.zeros((1, 1, 2, 2), bool)
    grads = jax.grad(lambda q: dot_product_attention(q, k, v, mask)[0].sum())(q)
    assert np.isfinite(np.asarray(grads)).all()


def test_relative_attention_shifts_scores_by_query_dot_relative_key(key):
    """Only the relative keys differ: the score change is q . (rk1 - rk0) / sqrt(H)."""
    mha = MultiHeadAttention(num_heads=2, d_model=8, maximum_relative_position=2)
    x = jax.random.normal(key, (1, 4, 8))
    params = mha.init(key, x)["params"]
    assert params["relative_keys"].shape == (5, 4) and params["relative_values"].shape == (5, 4)
    zero_rel = dict(params, relative_keys=jnp.zeros((5, 4)), relative_values=jnp.zeros((5, 4)))
    out_rel, _ = mha.apply({"params": params}, x)
    out_abs, _ = mha.apply({"params": zero_rel}, x)
    assert not np.allclose(out_rel, out_abs)  # the relative tables are used
