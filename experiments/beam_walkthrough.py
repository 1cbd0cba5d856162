"""Walk through the first steps of beam search, tensor by tensor, as the OpenNMT-tf inference article does.

Command:  python experiments/beam_walkthrough.py [--steps 4] [--seed 0]
          python experiments/beam_walkthrough.py --checkpoint tests/data/opennmt_tf/article \
              --source "l h f l o u" [--source-vocabulary F --target-vocabulary F]

The set-up is the article's: its toy Transformer (preset ``article``: vocab 26, num_units 6, 1 layer,
2 heads, ffn_inner_dim 12, maximum_relative_position 8; random weights, or with ``--checkpoint`` the
weights of a real OpenNMT-tf checkpoint of that model read by ``load_pretrained``), beam_size 2,
length_penalty 0.2, coverage_penalty 0.2, sampling_topk 5, sampling_temperature 0.5, start id 1,
end id 2. For each of the first steps it prints the tensors of ``dynamic_decode(..., trace=True)``:
log_probs, total_probs (log_probs + cumulated), scores (with penalties), the sampled flat ids over
beam x vocab, word_ids = ids % V, beam_ids = ids // V, beam_indices, finished, sequence_lengths and the
accumulated attention, then the final hypotheses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import Transformer, init_params, load_pretrained, preset
from jaxformer import decoding as dec

START_ID, END_ID = 1, 2


def load_checkpoint(path, source_vocabulary=None, target_vocabulary=None):
    """An OpenNMT-tf checkpoint of the article's model (its vocabularies default to the files
    ``src_vocab.txt`` / ``tgt_vocab.txt`` beside it, when present)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    hints = {"positions": "none"}  # the article's model has relative positions, no sinusoids
    for name, given, default in (
        ("source_vocabulary", source_vocabulary, "src_vocab.txt"),
        ("target_vocabulary", target_vocabulary, "tgt_vocab.txt"),
    ):
        if given is not None or (folder / default).exists():
            hints[name] = given if given is not None else folder / default
    return load_pretrained(path, **hints)


def run(
    steps: int = 4,
    seed: int = 0,
    source_length: int = 5,
    pretrained=None,
    source: str | None = None,
) -> dict:
    """Decode one source with the article's settings; returns the trace as NumPy arrays.

    ``pretrained``: a loaded checkpoint (``load_checkpoint``), else random weights; ``source``: its
    tokenized text (needs the checkpoint's source vocabulary), else random ids."""
    if pretrained is None:
        config = preset("article")
        model = Transformer(config)
        params = init_params(model, jax.random.key(seed))
    else:
        model, params, config = pretrained.model, pretrained.params, pretrained.config
    if source is not None:
        if pretrained is None or pretrained.source_tokenizer is None:
            raise ValueError("--source needs --checkpoint and its source vocabulary")
        src = jnp.asarray([pretrained.source_tokenizer.encode(source)], jnp.int32)
        source_length = src.shape[1]
    else:
        vocab = config.source_vocab_size
        src = jax.random.randint(jax.random.key(seed + 1), (1, source_length), 3, vocab)
    encoded, valid = model.apply({"params": params}, src, method=Transformer.encode)
    memory = model.apply({"params": params}, encoded, valid, method=Transformer.init_memory)
    cache = model.apply({"params": params}, 1, steps, method=Transformer.init_cache)
    result = dec.dynamic_decode(
        dec.step_function(dec.adapter_for(model), params),  # the model's decode_step
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
        vocab_size=config.vocab_size,
        target_tokenizer=None if pretrained is None else pretrained.target_tokenizer,
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
    vocab = out["vocab_size"]
    lines = [f"source ids: {out['source'][0].tolist()}   (beam 2, V {vocab}; rows are b0w0, b0w1)"]
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
    tokenizer = out["target_tokenizer"]
    for w in range(out["ids"].shape[1]):
        ids = out["ids"][0, w]
        text = "" if tokenizer is None else f" = {tokenizer.decode(ids[: out['lengths'][0, w]])!r}"
        lines.append(
            f"hypothesis {w}: ids {ids.tolist()}{text} length {out['lengths'][0, w]} "
            f"log_prob {out['log_probs'][0, w]:.4f} score {out['scores'][0, w]:.4f}"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="an OpenNMT-tf checkpoint of the article's model")
    parser.add_argument("--source", help="tokenized source text (with --checkpoint)")
    parser.add_argument("--source-vocabulary", help="default: src_vocab.txt beside the checkpoint")
    parser.add_argument("--target-vocabulary", help="default: tgt_vocab.txt beside the checkpoint")
    args = parser.parse_args()
    pretrained = None
    if args.checkpoint:
        pretrained = load_checkpoint(
            args.checkpoint, args.source_vocabulary, args.target_vocabulary
        )
    print(describe(run(args.steps, args.seed, pretrained=pretrained, source=args.source)))


if __name__ == "__main__":
    main()
