"""Walk through the first steps of beam search, tensor by tensor, as the OpenNMT-tf inference article does.

Command:  python experiments/beam_walkthrough.py [--steps 4] [--seed 0] [--greedy-sampling]

The set-up is the article's: its toy Transformer (preset ``article``: vocab 26, num_units 6, 1 layer,
2 heads, ffn_inner_dim 12, maximum_relative_position 8; random weights here), beam_size 2,
length_penalty 0.2, coverage_penalty 0.2, sampling_topk 5, sampling_temperature 0.5, start id 1,
end id 2. For each of the first steps it prints the tensors of ``dynamic_decode(..., trace=True)``:
log_probs, total_probs (log_probs + cumulated), scores (with penalties), the sampled flat ids over
beam x vocab, word_ids = ids % V, beam_ids = ids // V, beam_indices, finished, sequence_lengths and the
accumulated attention, then the final hypotheses.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import Transformer, init_params, preset, transformer_step_fn
from jaxformer import decoding as dec

START_ID, END_ID = 1, 2


def run(steps: int = 4, seed: int = 0, source_length: int = 5) -> dict:
    """Decode one random source with the article's settings; returns the trace as NumPy arrays."""
    config = preset("article")
    model = Transformer(config)
    params = init_params(model, jax.random.key(seed))
    src = jax.random.randint(jax.random.key(seed + 1), (1, source_length), 3, config.vocab_size)
    encoded, valid = model.apply({"params": params}, src, method=Transformer.encode)
    memory = model.apply({"params": params}, encoded, valid, method=Transformer.init_memory)
    cache = model.apply({"params": params}, 1, steps, method=Transformer.init_cache)
    result = dec.dynamic_decode(
        transformer_step_fn(model, params),
        jnp.full([1], START_ID, jnp.int32),
        END_ID,
        cache,
        strategy=dec.BeamSearch(2, length_penalty=0.2, coverage_penalty=0.2),
        sampler=dec.RandomSampler(topk=5, temperature=0.5),
        max_length=steps,
        rng=jax.random.key(seed + 2),
        attention_size=source_length,
        trace=True,
        shared=memory,  # read by the beams, never tiled nor reordered
    )
    trace = {k: np.asarray(v) for k, v in result.trace.items()}
    trace["ids"] = trace["beam_ids"] * config.vocab_size + trace["word_ids"]
    return dict(
        source=np.asarray(src),
        trace=trace,
        ids=np.asarray(result.ids),
        lengths=np.asarray(result.lengths),
        log_probs=np.asarray(result.log_probs),
        scores=np.asarray(result.scores),
        steps=int(result.steps),
    )


def describe(out: dict) -> str:
    trace = out["trace"]
    lines = [f"source ids: {out['source'][0].tolist()}   (beam 2, V 26; rows are b0w0, b0w1)"]
    fmt = lambda x: np.array2string(x, precision=3, suppress_small=True, max_line_width=160)
    for t in range(out["steps"]):
        lines.append(f"\n=== step {t} ===")
        for name in ("log_probs", "total_probs", "scores"):
            lines.append(f"{name} [B*W, V]:\n{fmt(trace[name][t])}")
        for name in ("ids", "word_ids", "beam_ids", "beam_indices", "finished", "sequence_lengths"):
            lines.append(f"{name:>17}: {trace[name][t].tolist()}")
        lines.append(f"   cum_log_probs: {fmt(trace['cum_log_probs'][t])}")
        lines.append(f"accumulated_attention [B*W, S]:\n{fmt(trace['accumulated_attention'][t])}")
    lines.append("\n=== result (best first) ===")
    for w in range(out["ids"].shape[1]):
        lines.append(
            f"hypothesis {w}: ids {out['ids'][0, w].tolist()} length {out['lengths'][0, w]} "
            f"log_prob {out['log_probs'][0, w]:.4f} score {out['scores'][0, w]:.4f}"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(describe(run(args.steps, args.seed)))


if __name__ == "__main__":
    main()
