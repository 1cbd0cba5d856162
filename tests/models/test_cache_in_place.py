"""A decode step reads its KV cache before writing it, and the compiled loop updates it in place.

``KVCache.attend`` / ``BeamKVCache.attend`` with ``new=(k, v)`` give what writing the new key and value and then
attending gives, whatever the cache held at the new slot; compiled by ``generate`` (XLA:CPU with
``CPU_COMPILER_OPTIONS``), the decode loop has no copy of a whole cache left in it (the copies made
a step's cost grow with the preallocated length).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import generate
from jaxformer.decoding import BeamSearch, GreedySearch, cpu_compiler_options, generation
from jaxformer.models.cache import BeamKVCache, KVCache

from helpers import DecoderOnlyLM, Transformer, make, source_batch

R, N, S, H, W = 6, 2, 7, 4, 3


def random(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def relative_tables(rows):
    return random(10, (rows, S, H)), random(11, (rows, S, H))


def assert_attend_new_equals_writing_first(cache, positions, extras):
    """``positions``: one per row, or None (a scalar position for every row)."""
    q, k, v = random(2, (R, 1, N, H)), random(3, (R, 1, N, H)), random(4, (R, 1, N, H))
    per_row = positions is not None
    last = jnp.asarray(positions) if per_row else jnp.int32(4)
    relative = relative_tables(R if per_row else 1) if extras == "relative" else (None, None)
    bias = random(12, (R, N, 1, S)) if extras == "bias" else None
    expected = cache.write(k, v, last).attend(q, last, relative, bias)
    got = cache.attend(q, last, relative, bias, new=(k, v))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("extras", ["plain", "relative", "bias"])
def test_attend_new_equals_writing_first(per_row, extras):
    cache = KVCache(k=random(0, (R, N, S, H)), v=random(1, (R, N, S, H)))  # every slot holds junk
    assert_attend_new_equals_writing_first(cache, [0, 2, 6, 3, 5, 1] if per_row else None, extras)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("extras", ["plain", "relative", "bias"])
def test_attend_new_through_the_origin_table_equals_writing_first(per_row, extras):
    base = BeamKVCache.tile(random(0, (R // W, N, S, H)), random(1, (R // W, N, S, H)), W)
    rows = jnp.arange(R) // W * W
    for seed in range(3):  # reorders leave origin pointing at other beams' slots
        base = base.reorder_beams(rows + jax.random.randint(jax.random.key(seed), (R,), 0, W))
    # The W beams of an entry are at one position (ragged prompts: per entry, not per beam).
    assert_attend_new_equals_writing_first(base, [2, 2, 2, 5, 5, 5] if per_row else None, extras)


def loop_copies(hlo: str, shapes: set[str]) -> list[str]:
    """The ``copy`` instructions of a cache's shape outside the entry computation (in loop bodies)."""
    copies, entry = [], False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            entry = line.startswith("ENTRY")
        match = re.match(r"\s+(?:ROOT )?%\S+ = (\w+\[[\d,]*\])\S* copy\(", line)
        if match and not entry and match.group(1) in shapes:
            copies.append(line.strip()[:120])
    return copies


@pytest.mark.parametrize("strategy", [GreedySearch(), BeamSearch(3)], ids=["greedy", "beam"])
def test_the_compiled_decode_loop_copies_no_cache(strategy):
    model, params = make(Transformer)
    src = source_batch()
    c, length = model.config, 24
    heads, head_dim = c.num_heads, c.d_model // c.num_heads
    batch = src.shape[0]
    shapes = {
        f"f32[{batch},{heads},{length},{head_dim}]",  # KVCache [B, N, S, H]
        f"f32[{batch},{heads},{strategy.width},{length},{head_dim}]",  # BeamKVCache [B, N, W, S, H]
    }

    def decode(params, src):
        result = generate(
            model, params, src, start_id=1, end_id=2, max_length=length, strategy=strategy
        )
        return result.ids

    options = cpu_compiler_options("cpu")
    hlo = jax.jit(decode, compiler_options=options).lower(params, src).compile().as_text()
    assert loop_copies(hlo, shapes) == []
    # The check can fail: XLA's default copy insertion leaves copies of every layer's cache.
    hlo = jax.jit(decode).lower(params, src).compile().as_text()
    assert len(loop_copies(hlo, shapes)) >= c.num_decoder_layers


def test_the_compiled_decode_loop_copies_no_cache_with_grouped_key_value_heads():
    """Beam search over a decoder-only LM of 2 key/value heads for 4 query heads (rotary positions,
    a sliding window): the caches are [B, K, S, H] / [B, K, W, S, H] and stay in place too."""
    model, params = make(DecoderOnlyLM, num_kv_heads=2, positions="rotary", sliding_window=4)
    prompts = source_batch()  # [3, 6]
    strategy, length = BeamSearch(3), 24
    slots = prompts.shape[1] - 1 + length  # the prompt's first tokens, then the search's
    shapes = {f"f32[3,2,{slots},8]", f"f32[3,2,3,{slots},8]"}

    def decode(params, prompts):
        return generate(model, params, prompts, end_id=2, max_length=length, strategy=strategy).ids

    options = cpu_compiler_options("cpu")
    hlo = jax.jit(decode, compiler_options=options).lower(params, prompts).compile().as_text()
    assert all(shape in hlo for shape in shapes)  # the caches hold K = 2 heads
    assert loop_copies(hlo, shapes) == []


def test_generate_inside_a_callers_jit_equals_generate():
    model, params = make(Transformer)
    src = source_batch()
    run = lambda p, s: generate(model, p, s, start_id=1, end_id=2, max_length=9).ids
    np.testing.assert_array_equal(jax.jit(run)(params, src), run(params, src))


def test_an_option_this_xla_does_not_know_is_left_out_with_a_warning(monkeypatch):
    """A later jaxlib may drop an XLA option: decoding must then warn and run without it, not fail
    with "No such compile option" at every call."""
    unknown = "xla_cpu_an_option_no_xla_has"
    options = {**generation.CPU_COMPILER_OPTIONS, unknown: True}
    monkeypatch.setattr(generation, "CPU_COMPILER_OPTIONS", options)
    generation._known_options.cache_clear()  # each set of options is tried once per process
    with pytest.warns(RuntimeWarning, match=unknown):
        kept = cpu_compiler_options("cpu")
    assert kept == {k: v for k, v in options.items() if k != unknown} and kept
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"(?i)no such compile option"):
        jax.jit(lambda: jnp.zeros(()), compiler_options=options).lower().compile()
    assert cpu_compiler_options("gpu") is None
