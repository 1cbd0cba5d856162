"""The training core: loss, schedule, train_step (tracing, donation, dropout keys), checkpoints."""

from typing import Any, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import DecoderOnlyLM, Transformer, init_params, preset
from jaxformer.models.hourglass import HourglassLM
from jaxformer.training import checkpoint as ckpt
from jaxformer.training.losses import cross_entropy, token_accuracy
from jaxformer.training.step import (
    BatchLayout,
    TrainConfig,
    batch_layout,
    create_train_state,
    make_eval_step,
    make_schedule,
    make_train_step,
    perplexity,
    train_step_fn,
)

VOCAB = 32
BOS, EOS = 1, 2


def copy_batches(n, batch=16, length=8, seed=0, reverse=False):
    """``n`` batches of a copy (or reverse) task, with ragged lengths padded by 0."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        src = rng.integers(3, VOCAB, (batch, length)).astype(np.int32)
        lengths = rng.integers(length // 2, length + 1, batch)
        src = np.where(np.arange(length)[None] < lengths[:, None], src, 0)
        tgt = src[:, ::-1].copy() if reverse else src.copy()
        if reverse:  # move the padding back to the end
            tgt = np.stack([np.concatenate([r[r != 0], r[r == 0]]) for r in tgt])
        tgt_out = np.concatenate([tgt, np.zeros((batch, 1), np.int32)], 1)
        tgt_out[np.arange(batch), lengths] = EOS
        tgt_in = np.concatenate([np.full((batch, 1), BOS, np.int32), tgt_out[:, :-1]], 1)
        tgt_in = np.where(tgt_in == EOS, 0, tgt_in)
        out.append(
            {k: jnp.asarray(v) for k, v in dict(src=src, tgt_in=tgt_in, tgt_out=tgt_out).items()}
        )
    return out


# 1. Loss -------------------------------------------------------------------------------------


def numpy_cross_entropy(logits, targets, weights, eps, over):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    v = logits.shape[-1]
    if over == "others":  # OpenNMT-tf: on 1 - eps, off eps / (V - 1)
        q = np.full(logits.shape, eps / (v - 1))
        np.put_along_axis(q, targets[..., None], 1 - eps, -1)
    else:  # optax / Keras: (1 - eps) * one_hot + eps / V
        q = np.full(logits.shape, eps / v)
        np.put_along_axis(q, targets[..., None], 1 - eps + eps / v, -1)
    token = -(q * logp).sum(-1)
    return (token * weights).sum(), weights.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("over", ["others", "all"])
def test_cross_entropy_matches_numpy(eps, over):
    k1, k2 = jax.random.split(jax.random.key(3))
    logits = 3.0 * jax.random.normal(k1, (2, 5, VOCAB))
    targets = jax.random.randint(k2, (2, 5), 0, VOCAB)
    weights = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    loss_sum, weight_sum = cross_entropy(logits, targets, weights, eps, over)
    want_sum, want_weights = numpy_cross_entropy(
        logits, np.asarray(targets), np.asarray(weights), eps, over
    )
    np.testing.assert_allclose(loss_sum, want_sum, rtol=1e-5)
    assert float(weight_sum) == want_weights == 8.0


def test_padding_changes_nothing_in_loss_and_accuracy():
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    logits = jax.random.normal(k1, (2, 5, VOCAB))
    targets = jax.random.randint(k2, (2, 5), 1, VOCAB)
    weights = jnp.ones((2, 5))
    # Three more positions of padding, with arbitrary (even non-finite) logits there.
    extra = jax.random.normal(k3, (2, 3, VOCAB)).at[0, 0, 0].set(jnp.inf)
    padded_logits = jnp.concatenate([logits, extra], 1)
    padded_targets = jnp.concatenate([targets, jnp.zeros((2, 3), jnp.int32)], 1)
    padded_weights = jnp.concatenate([weights, jnp.zeros((2, 3))], 1)
    for eps in (0.0, 0.1):
        a = cross_entropy(logits, targets, weights, eps)
        b = cross_entropy(padded_logits, padded_targets, padded_weights, eps)
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_array_equal(
        token_accuracy(logits, targets, weights),
        token_accuracy(padded_logits, padded_targets, padded_weights),
    )


def test_model_padding_changes_nothing_in_eval():
    model = Transformer(preset("tiny"))
    params = init_params(model, jax.random.key(0))
    batch = copy_batches(1, batch=4)[0]
    padded = {k: jnp.pad(v, ((0, 0), (0, 3))) for k, v in batch.items()}  # 3 more pad columns
    eval_step = make_eval_step(model)
    a, b = eval_step(params, batch), eval_step(params, padded)
    np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-5)
    assert float(a["correct"]) == float(b["correct"])
    assert float(a["tokens"]) == float(b["tokens"]) == float((batch["tgt_out"] != 0).sum())
    assert perplexity(float(a["loss_sum"] / a["tokens"])) > 1.0


# 2. Schedule ---------------------------------------------------------------------------------


def test_schedule_is_noam_decay_with_step_plus_one():
    d, warmup, scale = 512, 4000, 2.0
    schedule = make_schedule(d, warmup, scale)
    for count in (0, 1, 9, warmup - 2, warmup - 1, warmup, 10 * warmup):
        s = count + 1  # OpenNMT-tf NoamDecay: step + 1
        want = scale * d**-0.5 * min(s**-0.5, s * warmup**-1.5)
        np.testing.assert_allclose(schedule(count), want, rtol=1e-6)
    peak = scale * (d * warmup) ** -0.5  # reached at count = warmup - 1
    np.testing.assert_allclose(schedule(warmup - 1), peak, rtol=1e-6)
    assert schedule(warmup - 2) < schedule(warmup - 1) and schedule(warmup) < schedule(warmup - 1)


# 3. Learning ---------------------------------------------------------------------------------

THRESHOLD = 1.5  # mean loss of the last 20 steps; it starts near 3.4 (ln 32 ≈ 3.47)


def fixed_copy_batches(n, batch=16, length=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(3, VOCAB, (batch, length)).astype(np.int32)
        tgt_in = np.concatenate([np.full((batch, 1), BOS, np.int32), x], 1)
        tgt_out = np.concatenate([x, np.full((batch, 1), EOS, np.int32)], 1)
        out.append(
            dict(src=jnp.asarray(x), tgt_in=jnp.asarray(tgt_in), tgt_out=jnp.asarray(tgt_out))
        )
    return out


def run_copy_task(learning_rate, steps=300):
    model = Transformer(preset("tiny", dropout=0.0, attention_dropout=0.0, ffn_dropout=0.0))
    config = TrainConfig(learning_rate=learning_rate, warmup_steps=50, clip_norm=1.0)
    state = create_train_state(model, jax.random.key(0), config)
    train_step = make_train_step(model, config)
    losses = []
    for batch in fixed_copy_batches(steps):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.asarray(losses)


def test_copy_task_loss_falls_and_lr_zero_does_not():
    losses = run_copy_task(learning_rate=1.0)
    start, end = losses[:20].mean(), losses[-20:].mean()
    assert start > 3.0, start
    assert end < THRESHOLD, (start, end)
    frozen = run_copy_task(learning_rate=0.0)  # a broken optimizer must fail the same bar
    assert frozen[-20:].mean() > THRESHOLD, frozen[-20:].mean()
    np.testing.assert_allclose(frozen[-20:].mean(), frozen[:20].mean(), rtol=0.05)


# 4. Tracing and donation ---------------------------------------------------------------------


def test_train_step_traces_once_and_donates_state():
    model = Transformer(preset("tiny"))
    config = TrainConfig(warmup_steps=10)
    state = create_train_state(model, jax.random.key(0), config)
    train_step = make_train_step(model, config, max_traces=1)
    batches = copy_batches(3, batch=4)
    for batch in batches:
        old = state
        state, _ = train_step(state, batch)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
        assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert int(state.step) == 3
    assert train_step._cache_size() == 1
    with pytest.raises(AssertionError, match="traced"):  # a new shape is a second trace
        wider = {k: jnp.pad(v, ((0, 0), (0, 1))) for k, v in batches[0].items()}
        train_step(state, wider)
    chex.clear_trace_counter()


def test_the_pure_step_jitted_by_the_user_equals_the_library_step():
    model, config = Transformer(preset("tiny", dropout=0.3)), TrainConfig(warmup_steps=10)
    fresh = lambda: create_train_state(model, jax.random.key(0), config)
    library = make_train_step(model, config)
    users = jax.jit(train_step_fn(model, config))  # no donation: the user's own choice
    also = jax.jit(make_train_step(model, config, jit=False))
    assert not hasattr(make_train_step(model, config, jit=False), "lower")  # not a jitted function
    states = [fresh(), fresh(), fresh()]
    # Compiled with XLA:CPU's default fusion emitters, as users get them: with the older ones that
    # tests/conftest.py selects for compile speed, a donated and an undonated build of one step
    # round differently, and Adam turns that into 1e-3 moves of near-zero-gradient weights.
    as_users_get_it = {"xla_cpu_use_fusion_emitters": True}
    batches = copy_batches(2, batch=4)
    steps = [
        f.lower(states[0], batches[0]).compile(compiler_options=as_users_get_it)
        for f in (library, users, also)
    ]
    for batch in batches:
        old = states[1]
        outs = [step(state, batch) for step, state in zip(steps, states, strict=True)]
        assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(old))
        states = [state for state, _ in outs]
        for state, metrics in outs[1:]:  # dropout, optimiser and step count included
            chex.assert_trees_all_close(metrics, outs[0][1], rtol=1e-6, atol=1e-7)
            chex.assert_trees_all_close(state, outs[0][0], rtol=1e-6, atol=1e-7)
    assert int(states[0].step) == 2


class ToySeq2Seq(nn.Module):
    """A model family the trainer has never seen: it declares its inputs, nothing else."""

    config: Any
    INPUTS: ClassVar[tuple[str, ...]] = ("src_ids", "tgt_in_ids")

    @nn.compact
    def __call__(self, src_ids, tgt_in_ids, deterministic: bool = True):
        embed = nn.Embed(self.config.vocab_size, self.config.d_model)
        context = embed(src_ids).mean(axis=1, keepdims=True)  # [B, 1, D]
        return nn.Dense(self.config.vocab_size)(embed(tgt_in_ids) + context)  # [B, T, V]


class Undeclared(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, ids, deterministic: bool = True):
        return nn.Dense(VOCAB)(ids)


def test_the_batch_layout_follows_from_the_inputs_a_model_declares():
    assert batch_layout(Transformer(preset("tiny"))) == BatchLayout(("src", "tgt_in"), "tgt_out")
    for lm in (DecoderOnlyLM(preset("tiny")), HourglassLM(None)):  # the class decides
        assert batch_layout(lm) == BatchLayout(("ids",), "targets")
    # A new family trains and evaluates with no change to the trainer.
    model, config = ToySeq2Seq(preset("tiny")), TrainConfig(warmup_steps=10, learning_rate=1.0)
    state = create_train_state(model, jax.random.key(0), config)
    train_step, eval_step = make_train_step(model, config), make_eval_step(model)
    batch = copy_batches(1, batch=4)[0]
    before = float(eval_step(state.params, batch)["loss_sum"])
    for _ in range(5):
        state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert float(eval_step(state.params, batch)["loss_sum"]) < before
    with pytest.raises(TypeError, match="Undeclared declares no INPUTS"):
        batch_layout(Undeclared(preset("tiny")))


# 5. Dropout keys and reproducibility ---------------------------------------------------------


DROPOUT_MODEL = Transformer(preset("tiny", dropout=0.3))
DROPOUT_CONFIG = TrainConfig(warmup_steps=10)
_STEPS = {}


def dropout_train_step():
    """One compiled step shared by the dropout tests (compiling is most of their cost)."""
    if "step" not in _STEPS:
        _STEPS["step"] = make_train_step(DROPOUT_MODEL, DROPOUT_CONFIG)
    return _STEPS["step"]


def run(seed, steps=4, first_step=0):
    state = create_train_state(DROPOUT_MODEL, jax.random.key(seed), DROPOUT_CONFIG)
    state = state.replace(step=jnp.asarray(first_step, jnp.int32))
    history = []
    for batch in copy_batches(steps, batch=4):
        state, metrics = dropout_train_step()(state, batch)
        history.append(jax.device_get(metrics))
    return history, state


def test_dropout_key_differs_per_step():
    # The same parameters and batch; only the step (hence the dropout key) differs. The loss is
    # computed before the update, so only the dropout mask can change it.
    (a,), _ = run(0, steps=1, first_step=0)
    (b,), _ = run(0, steps=1, first_step=1)
    assert a["loss"] != b["loss"]
    (c,), _ = run(0, steps=1, first_step=0)
    assert a["loss"] == c["loss"]


def test_same_seed_reproduces_the_run_exactly():
    (a, state_a), (b, state_b), (c, _) = run(0), run(0), run(1)
    chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal(state_a.params, state_b.params)
    assert a[0]["loss"] != c[0]["loss"]


# 6. Checkpoints ------------------------------------------------------------------------------


def test_resume_equals_uninterrupted_run(tmp_path):
    model = Transformer(preset("tiny"))
    config = TrainConfig(warmup_steps=10, clip_norm=1.0)
    batches = copy_batches(6, batch=4)
    valid = copy_batches(1, batch=8, seed=9)[0]
    eval_step = make_eval_step(model)
    directory = tmp_path / "ckpt"

    # Uninterrupted run, saving every 2 steps with the validation loss.
    manager = ckpt.make_manager(directory, keep=2, best_metric="valid_loss")
    state = create_train_state(model, jax.random.key(0), config)
    train_step = make_train_step(model, config)
    history, valid_losses = [], {}
    for batch in batches:
        state, metrics = train_step(state, batch)
        history.append(jax.device_get(metrics))
        step = int(state.step)
        if step % 2 == 0:
            sums = eval_step(state.params, valid)
            valid_losses[step] = float(sums["loss_sum"] / sums["tokens"])
            assert ckpt.save(manager, step, state, {"valid_loss": valid_losses[step]})
    manager.close()
    best = min(valid_losses, key=valid_losses.get)
    on_disk = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    assert on_disk == sorted({4, 6, best})

    # "A new process": new manager, new state objects (another seed), a fresh jit.
    manager = ckpt.make_manager(directory, keep=2, best_metric="valid_loss")
    fresh = create_train_state(model, jax.random.key(123), config)
    resumed = ckpt.restore(manager, ckpt.abstract_state(fresh), step=4)
    assert int(resumed.step) == 4
    train_step = make_train_step(model, config)
    for i, batch in enumerate(batches[4:], start=4):
        resumed, metrics = train_step(resumed, batch)
        chex.assert_trees_all_equal(jax.device_get(metrics), history[i])
    chex.assert_trees_all_equal(resumed, state)  # params, Adam moments, step, rng: bit for bit
    latest = ckpt.restore_latest(manager, ckpt.abstract_state(fresh))
    chex.assert_trees_all_equal(latest, state)
    manager.close()

    # Inference: the parameters alone.
    abstract_params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    params = ckpt.restore_params(directory, abstract_params)
    chex.assert_trees_all_equal(params, state.params)

    # Clear errors.
    with pytest.raises(FileNotFoundError, match="missing"):
        ckpt.restore_params(tmp_path / "missing")
    empty = ckpt.make_manager(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty"):
        ckpt.restore_latest(empty, ckpt.abstract_state(fresh))
    empty.close()
    other = Transformer(preset("tiny", ffn_dim=48))
    manager = ckpt.make_manager(directory)
    with pytest.raises(ValueError, match=r"ckpt step 6 does not match(.|\n)*ffn"):
        ckpt.restore_latest(
            manager, ckpt.abstract_state(create_train_state(other, jax.random.key(0), config))
        )
    deeper = Transformer(preset("tiny", num_decoder_layers=3))
    with pytest.raises(ValueError, match=r"missing in checkpoint: .*layer_2"):
        ckpt.restore_latest(
            manager, ckpt.abstract_state(create_train_state(deeper, jax.random.key(0), config))
        )
    manager.close()
    with pytest.raises(ValueError, match="ckpt step 6 does not match"):
        ckpt.restore_params(
            directory, jax.eval_shape(lambda: init_params(other, jax.random.key(0)))
        )


def test_keeps_last_n_plus_best(tmp_path):
    state = {"w": jnp.zeros(3)}
    manager = ckpt.make_manager(tmp_path, keep=2, best_metric="valid_loss")
    for step, loss in [(1, 1.0), (2, 3.0), (3, 2.0), (4, 4.0), (5, 5.0)]:
        ckpt.save(manager, step, state, {"valid_loss": loss})
    assert sorted(manager.all_steps()) == [1, 4, 5]  # the last two and the best (lowest loss)
    assert manager.best_step() == 1
    assert manager.latest_step() == 5
    manager.close()
