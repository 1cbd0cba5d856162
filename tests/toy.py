"""The toy stateful model of the search tests, in JAX (the NumPy twin is in reference_search.py).

logits = logit_table[step, ids] + bonus[h % M]; h' = (3h + ids + 1) % M; attention = softmax of
att_table[step, ids] over the first src_len source positions (exact zeros after). The state makes the
logits depend on the whole history, so a search that reorders its state wrongly gives wrong answers.
"""

import jax
import jax.numpy as jnp


def jax_toy_step_fn(params):
    logit_table = jnp.asarray(params["logit_table"])  # [T, V, V]
    bonus = jnp.asarray(params["bonus"])  # [M, V]
    att_table = jnp.asarray(params["att_table"])  # [T, V, S]
    modulus, source_len = bonus.shape[0], att_table.shape[-1]

    def step_fn(ids, step, state):
        h, src_len = state["h"], state["src_len"]
        logits = logit_table[step, ids] + bonus[h % modulus]  # [R, V]
        valid = jnp.arange(source_len)[None, :] < src_len[:, None]  # [R, S]
        scores = jnp.where(valid, att_table[step, ids], -jnp.inf)
        attention = jnp.where(valid, jax.nn.softmax(scores, axis=-1), 0.0)
        return logits, {"h": (h * 3 + ids + 1) % modulus, "src_len": src_len}, attention

    return step_fn


def initial_state(params, batch):
    return {
        "h": jnp.zeros([batch], jnp.int32),
        "src_len": jnp.asarray(params["src_len"], jnp.int32),
    }
