"""Greedy and beam search with a tiny random Transformer, with the KV cache and without.

Command:  python experiments/cache_demo.py [--batch 4] [--length 48]

Prints, for a batch of random source sentences, the greedy output decoded with the KV cache (one
jit-compiled lax.scan over one-token steps) and without it (the whole prefix recomputed every step),
checks that they agree token for token, and times both; then prints the 4-best beam-search hypotheses
of the first source with their scores. The model is untrained (random weights, matrices scaled by 3
so the outputs vary), so the tokens are arbitrary: the point is the mechanics and the cost. `make demo` trains a real one (experiments/demo.py).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import jax
import numpy as np

from jaxformer import Transformer, generate, init_params, preset
from jaxformer import decoding as dec
from jaxformer.decoding.baselines import greedy_without_cache

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py
from common import timed_runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=48, help="tokens to generate")
    args = parser.parse_args()

    config = preset("tiny", max_len=max(128, args.length))
    model = Transformer(config)
    params = init_params(model, jax.random.key(0))
    # An untrained model at its initial scale repeats one token; larger random matrices make the
    # outputs vary, which shows the decoding better. The weights are still random.
    params = jax.tree.map(lambda x: 3.0 * x if x.ndim == 2 else x, params)
    src = jax.random.randint(jax.random.key(1), (args.batch, 12), 3, config.vocab_size)
    n = args.length
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; preset tiny, {n} tokens\n")

    cached, times_cached = timed_runs(
        lambda: generate(model, params, src, start_id=1, end_id=2, max_length=n, min_length=n).ids,
        repeats=3,
    )
    recomputed, times_recomputed = timed_runs(
        lambda: greedy_without_cache(model, params, src, start_id=1, end_id=2, max_length=n),
        repeats=3,
    )
    t_cached, t_recomputed = statistics.median(times_cached), statistics.median(times_recomputed)
    for b in range(args.batch):
        print(f"source {b}: {np.asarray(src[b]).tolist()}")
        print(f"  with cache   : {np.asarray(cached[b, 0, :16]).tolist()} ...")
        print(f"  without cache: {np.asarray(recomputed[b, :16]).tolist()} ...")
    same = np.array_equal(np.asarray(cached[:, 0]), np.asarray(recomputed))
    print(f"\nidentical outputs: {same}")
    print(f"with cache   : {1e3 * t_cached / n:7.3f} ms per token ({t_cached * 1e3:.1f} ms total)")
    print(
        f"without cache: {1e3 * t_recomputed / n:7.3f} ms per token ({t_recomputed * 1e3:.1f} ms)"
    )
    print(f"speed-up     : {t_recomputed / t_cached:.1f}x")

    beam = generate(
        model, params, src[:1], start_id=1, end_id=2, max_length=12,
        strategy=dec.BeamSearch(4, length_penalty=0.6),
    )  # fmt: skip
    print("\nbeam search (4 hypotheses, length penalty 0.6), source 0:")
    for w in range(4):
        print(
            f"  {w}: score {float(beam.scores[0, w]):8.3f}  log_prob "
            f"{float(beam.log_probs[0, w]):8.3f}  ids {np.asarray(beam.ids[0, w]).tolist()}"
        )
    if not same:
        raise SystemExit("cached and recomputed greedy outputs differ")


if __name__ == "__main__":
    main()
