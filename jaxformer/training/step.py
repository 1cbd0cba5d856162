"""A thin, pure trainer: ``train_step(state, batch) -> (state, metrics)``, jit-compiled, state donated.

    config = TrainConfig(warmup_steps=4000)
    model = Transformer(preset("base"))
    state = create_train_state(model, jax.random.key(config.seed), config)
    train_step = make_train_step(model, config)
    eval_step = make_eval_step(model)
    for batch in batches:                 # dict(src, tgt_in, tgt_out) int32, pad_id = padding
        state, metrics = train_step(state, batch)   # the old ``state`` is donated: do not reuse it
    sums = eval_step(state.params, valid_batch)     # add up over the validation set, then
    perplexity(sums["loss_sum"] / sums["tokens"])

``train_step_fn(model, config)`` (or ``make_train_step(..., jit=False)``) is the same step, pure and
un-jitted, for your own ``jax.jit`` / ``shard_map`` / scan over steps.

Batches: encoder-decoder models take ``dict(src [B, S], tgt_in [B, T], tgt_out [B, T])``; decoder-only
models (``DecoderOnlyLM``, ``HourglassLM``) take ``dict(ids [B, T], targets [B, T])``. Targets equal to
the model's ``pad_id`` have weight 0: they count in neither the loss nor the accuracy nor ``tokens``.
The layout follows from the token inputs the model class declares (``batch_layout``): a new model
family needs no change here.

Defaults follow OpenNMT-tf's Transformer ``auto_config`` (``opennmt/models/transformer.py``): label
smoothing 0.1, Adam with ``beta_1=0.9, beta_2=0.998``, learning rate scale 2.0, ``NoamDecay`` with 8000
warm-up steps, the loss averaged over tokens (``average_loss_in_time``), no gradient clipping.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxformer.models.params import init_params
from jaxformer.training.losses import SmoothOver, cross_entropy, padding_weights, token_accuracy
from jaxformer.typing import PRNGKey, PyTree


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters (frozen and hashable).

    ``adam_epsilon``: OpenNMT-tf's ``auto_config`` does not set it, so its LazyAdam uses the Keras /
    TensorFlow Addons default 1e-7; Vaswani et al. (2017, §5.3) used 1e-9 (with ``beta_2=0.98``).
    ``clip_norm=None`` (OpenNMT-tf's default) leaves gradients unclipped; a float adds
    ``optax.clip_by_global_norm`` before Adam.
    """

    learning_rate: float = 2.0  # the NoamDecay scale
    warmup_steps: int = 8000
    adam_b1: float = 0.9
    adam_b2: float = 0.998
    adam_epsilon: float = 1e-7
    clip_norm: float | None = None
    label_smoothing: float = 0.1
    smooth_over: SmoothOver = "others"  # OpenNMT-tf: eps / (V - 1); "all": optax/Keras, eps / V
    seed: int = 0

    def __post_init__(self):
        if self.warmup_steps < 1:
            raise ValueError(f"TrainConfig: warmup_steps must be >= 1, got {self.warmup_steps}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"TrainConfig: label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"TrainConfig: clip_norm must be None or > 0, got {self.clip_norm}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: a pytree, checkpointed whole."""

    step: Any  # int32[]        number of updates applied so far
    params: Any  # PyTree         model parameters (float32)
    opt_state: Any  # PyTree         optax state (Adam moments, counts)
    rng: Any  # uint32[2]      raw key data; step t drops out with fold_in(rng, t)

    @property
    def dropout_key(self) -> jax.Array:
        """The dropout key of the step about to run: ``fold_in(rng, step)``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def make_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """The inverse-square-root schedule of Vaswani et al. (2017), as OpenNMT-tf's ``NoamDecay``.

    ``lr(count) = scale * d_model**-0.5 * min(s**-0.5, s * warmup**-1.5)`` with ``s = count + 1``:
    optax (like the Keras optimizer OpenNMT-tf drives) calls the schedule with the number of updates
    already applied, 0 for the first one, and ``NoamDecay.__call__`` adds 1 before anything else
    (``opennmt/schedules/lr_schedules.py``). So step 0 never divides by zero, and the peak
    ``scale * (d_model * warmup)**-0.5`` is reached at ``count = warmup - 1``.
    """
    factor = scale * d_model**-0.5
    warmup = float(warmup_steps)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        return factor * jnp.minimum(jax.lax.rsqrt(s), s * warmup**-1.5)

    return schedule


def make_optimizer(config: TrainConfig, d_model: int) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if ``config.clip_norm``) then Adam with the Noam schedule.

    OpenNMT-tf trains the Transformer with LazyAdam (TensorFlow Addons), which updates only the
    embedding rows present in a batch; ``optax.adam`` is the dense equivalent (every row's moments
    decay every step). Keras applies epsilon to the bias-corrected ``sqrt(v)`` ("epsilon hat") while
    optax adds it to ``sqrt(v_hat)``; the two differ only in the effective epsilon.
    """
    schedule = make_schedule(d_model, config.warmup_steps, config.learning_rate)
    adam = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_epsilon)
    if config.clip_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adam)


def _d_model(model) -> int:
    return model.config.d_model


def _pad_id(model) -> int:
    return getattr(model.config, "pad_id", 0)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which batch entries a model reads: ``inputs`` in the order of its call, and the targets."""

    inputs: tuple[str, ...]
    targets: str


def batch_layout(model) -> BatchLayout:
    """The batch layout of ``model``, from the token inputs its class declares (``INPUTS``).

    A model input ``NAME_ids`` is read from the batch entry ``NAME`` (``ids`` from ``ids``), and the
    targets are named after the last input: ``tgt_in`` -> ``tgt_out``, any other -> ``targets``. So the
    encoder-decoder (``("src_ids", "tgt_in_ids")``) reads ``src, tgt_in -> tgt_out`` and the LMs
    (``("ids",)``) ``ids -> targets``. A model class may instead declare ``BATCH_LAYOUT`` itself.
    """
    declared = getattr(type(model), "BATCH_LAYOUT", None)
    if declared is not None:
        return declared
    names = getattr(type(model), "INPUTS", None)
    if not names:
        raise TypeError(
            f"{type(model).__name__} declares no INPUTS (the token arrays its __call__ takes, e.g. "
            '("ids",)) nor a BATCH_LAYOUT, so the trainer cannot tell which batch entries it reads'
        )
    inputs = tuple(name.removesuffix("_ids") for name in names)
    last = inputs[-1]
    targets = last.removesuffix("_in") + "_out" if last.endswith("_in") else "targets"
    return BatchLayout(inputs, targets)


def create_train_state(
    model, rng: PRNGKey, config: TrainConfig, params: PyTree | None = None
) -> TrainState:
    """Fresh parameters (or ``params``), optimizer state and dropout key; ``step = 0``."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    init_rng, dropout_rng = jax.random.split(rng)
    if params is None:
        params = init_params(model, init_rng)
    opt_state = make_optimizer(config, _d_model(model)).init(params)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(dropout_rng),
    )


def _forward(model, params, batch, *, deterministic: bool, dropout_key=None):
    """Logits ``[B, T, V]`` and targets ``[B, T]`` of a batch in the model's ``batch_layout``."""
    layout = batch_layout(model)
    rngs = None if deterministic else {"dropout": dropout_key}
    inputs = [batch[name] for name in layout.inputs]
    logits = model.apply({"params": params}, *inputs, deterministic=deterministic, rngs=rngs)
    return logits, batch[layout.targets]


def train_step_fn(model, config: TrainConfig):
    """The pure ``train_step(state, batch) -> (state, metrics)``: not jit-compiled, nothing donated,
    to compose with your own transformations (``jax.jit``, ``shard_map``, a scan over steps, ...).

    ``metrics`` (float32 scalars): ``loss`` (label-smoothed, per non-padding token: the quantity
    differentiated), ``accuracy`` (token accuracy), ``tokens``, ``grad_norm`` (global norm before
    clipping) and ``learning_rate`` (the rate this update used).
    """
    optimizer = make_optimizer(config, _d_model(model))
    schedule = make_schedule(_d_model(model), config.warmup_steps, config.learning_rate)
    pad_id = _pad_id(model)

    def loss_fn(params, batch, dropout_key):
        logits, targets = _forward(
            model, params, batch, deterministic=False, dropout_key=dropout_key
        )
        weights = padding_weights(targets, pad_id)  # [B, T]
        loss_sum, tokens = cross_entropy(
            logits, targets, weights, config.label_smoothing, config.smooth_over
        )
        loss = loss_sum / jnp.maximum(tokens, 1.0)
        return loss, (tokens, token_accuracy(logits, targets, weights))

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (tokens, correct)), grads = grad_fn(state.params, batch, state.dropout_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": correct / jnp.maximum(tokens, 1.0),
            "tokens": tokens,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_train_step(model, config: TrainConfig, *, jit: bool = True, max_traces: int | None = None):
    """``train_step_fn(model, config)``, jit-compiled with ``state`` donated (do not reuse the
    ``state`` passed in); ``jit=False`` returns the pure step itself.

    ``max_traces`` wraps the step in ``chex.assert_max_traces`` (tests: a second trace for the same
    shapes raises).
    """
    train_step = train_step_fn(model, config)
    if max_traces is not None:
        train_step = chex.assert_max_traces(train_step, n=max_traces)
    return jax.jit(train_step, donate_argnums=0) if jit else train_step


def make_eval_step(model):
    """A jit-compiled ``eval_step(params, batch) -> dict(loss_sum, correct, tokens)``.

    Deterministic (no dropout) and unsmoothed, as OpenNMT-tf evaluates: sum the three over the
    validation set, then ``loss = loss_sum / tokens``, ``perplexity(loss)``, ``correct / tokens``.
    """
    pad_id = _pad_id(model)

    def eval_step(params, batch):
        logits, targets = _forward(model, params, batch, deterministic=True)
        weights = padding_weights(targets, pad_id)
        loss_sum, tokens = cross_entropy(logits, targets, weights, label_smoothing=0.0)
        return {
            "loss_sum": loss_sum,
            "correct": token_accuracy(logits, targets, weights),
            "tokens": tokens,
        }

    return jax.jit(eval_step)


def evaluate(eval_step, params, batches) -> dict[str, float]:
    """Runs ``eval_step`` over ``batches``: ``dict(loss, perplexity, accuracy, tokens)`` (floats)."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step(params, batch))
        for name in totals:
            totals[name] += float(sums[name])
    tokens = max(totals["tokens"], 1.0)
    loss = totals["loss_sum"] / tokens
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "accuracy": totals["correct"] / tokens,
        "tokens": totals["tokens"],
    }


def perplexity(loss_per_token: float) -> float:
    """``exp`` of the mean per-token negative log-likelihood (``inf`` past float range)."""
    try:
        return math.exp(float(loss_per_token))
    except OverflowError:
        return math.inf


__all__ = [
    "BatchLayout",
    "TrainConfig",
    "TrainState",
    "batch_layout",
    "create_train_state",
    "evaluate",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "perplexity",
    "train_step_fn",
]
