"""Token-level losses and metrics for sequence models: label-smoothed cross-entropy and accuracy.

Every function returns *sums* and leaves normalisation to the caller (OpenNMT-tf's
``cross_entropy_sequence_loss`` returns ``(loss, normalizer, token_normalizer)`` for the same
reason): sums add up across micro-batches and devices, means do not.

Label smoothing. OpenNMT-tf (``opennmt/utils/losses.py``, ``_smooth_one_hot_labels``) spreads the
smoothing mass over the **V - 1 wrong classes**::

    q = one_hot(y, V, on_value=1 - eps, off_value=eps / (V - 1))

whereas ``optax.smooth_labels`` (like Keras, t5x and Szegedy et al. 2016) spreads it over **all V
classes**, the target included: ``q = (1 - eps) * one_hot + eps / V``. Both are one
``optax.smooth_labels`` call: smoothing over the other classes with ``eps`` equals smoothing over all
classes with ``eps * V / (V - 1)`` (the target gets ``1 - eps``, every other class ``eps / (V - 1)``).
``smooth_over="others"`` (the default) matches OpenNMT-tf; ``smooth_over="all"`` matches optax/Keras.
OpenNMT-tf smooths only the *training* loss; evaluation uses plain cross-entropy (``eval_step`` does
the same by passing ``label_smoothing=0``).
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import optax

from jaxformer.typing import Array, Float, Int

SmoothOver = Literal["others", "all"]


def smoothed_targets(
    targets: Int[Array, "B T"],
    vocab_size: int,
    label_smoothing: float,
    smooth_over: SmoothOver = "others",
) -> Float[Array, "B T V"]:
    """The smoothed target distribution (see the module docstring for the two conventions)."""
    if smooth_over == "others":
        alpha = label_smoothing * vocab_size / (vocab_size - 1)
    elif smooth_over == "all":
        alpha = label_smoothing
    else:
        raise ValueError(f"smooth_over must be 'others' or 'all', got {smooth_over!r}")
    one_hot = jnp.eye(vocab_size, dtype=jnp.float32)[targets]  # [B, T, V]
    return optax.smooth_labels(one_hot, alpha)


def cross_entropy(
    logits: Float[Array, "B T V"],
    targets: Int[Array, "B T"],
    weights: Float[Array, "B T"],
    label_smoothing: float = 0.1,
    smooth_over: SmoothOver = "others",
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """``(sum of weighted token losses, sum of weights)``; padding has weight 0 and counts for nothing.

    The softmax runs in float32 whatever the logits' dtype (as OpenNMT-tf does). Positions of weight
    0 are masked with ``jnp.where``, so even non-finite logits there cannot leak into the sum.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    if label_smoothing > 0.0:
        labels = smoothed_targets(targets, logits.shape[-1], label_smoothing, smooth_over)
        token_loss = optax.softmax_cross_entropy(logits, labels)  # [B, T]
    else:
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    token_loss = jnp.where(weights > 0, token_loss * weights, 0.0)
    return token_loss.sum(), weights.sum()


def token_accuracy(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"], weights: Float[Array, "B T"]
) -> Float[Array, ""]:
    """The weighted number of positions whose argmax is the target (divide by the weight sum)."""
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, T]
    return jnp.where(weights > 0, correct * weights.astype(jnp.float32), 0.0).sum()


def padding_weights(targets: Int[Array, "B T"], pad_id: int) -> Float[Array, "B T"]:
    """1.0 at real target tokens, 0.0 at padding."""
    return (targets != pad_id).astype(jnp.float32)
