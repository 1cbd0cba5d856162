"""Why cache? Time per generated token of greedy decoding with the KV cache and without it.

Command:  python experiments/kv_cache.py          (``make bench-kv``; about 4.5 minutes on 2 CPU cores)
          python experiments/kv_cache.py --smoke  (tiny preset, 8 and 16 tokens, into a temp dir)

For the presets ``tiny`` and ``base`` (6+6 layers, D 512, N 8, F 2048, V 32000), random parameters
(``init_params``, key 0) and one random source sentence of 32 tokens (batch 1), it decodes greedily
exactly N = 32, 64, 128, 256 and 512 tokens (``min_length=N``: EOS cannot end the search early) in
two ways, both one jit-compiled function that also runs the encoder once:

- **cached**: ``jaxformer.generate`` (``Transformer.encode``, ``init_cache``, then ``dynamic_decode``
  over one-token ``decode_step`` calls that write K/V into a preallocated cache of N slots);
- **recompute**: no cache (``recompute_greedy`` below). A ``lax.scan`` over N steps; step t runs the
  teacher-forced ``Transformer.decode`` over the whole target buffer of static length N (the causal
  mask makes the slots after t irrelevant), reads the logits at position t, picks the argmax (with the
  same EOS penalty ``dynamic_decode`` applies before ``min_length``) and writes it into slot t+1.

It checks that both give the same token ids, then prints a markdown table (preset, N, ms/token cached,
ms/token recompute, ratio recompute/cached, compile seconds of each, repeats, agreement), the slope of
log(ms/token) against log(N) for each curve, and the total run time. It writes
``experiments/results/kv_cache.json`` (every timing, the settings, the machine) and
``experiments/results/kv_cache.png`` (ms/token against N, log-log).

What to expect. Per generated token, the cached step processes one position per layer (plus attention
over the N preallocated, masked cache slots), so its cost is nearly flat in N: slope near 0. The
recompute step reprocesses all N positions, so its cost per token grows like N (slope near 1: the
dense layers and the vocabulary projection) and tends to N^2 once the attention over N x N positions
dominates. So the ratio recompute/cached grows roughly linearly with N.

Caveats of the baseline, so that the ratio is read correctly:

- A static-shape JAX recompute pays for the full padded length N at every step. A growing-prefix loop
  (step t runs over t+1 positions) would do about half the work on average (sum of t ~ N^2/2), so
  expect it to be about 2x cheaper than this baseline (not measured here), but it needs one compilation
  per prefix length (or per bucket of lengths), which is what JAX users avoid.
- ``Transformer.decode`` returns the logits of all N positions, so the recompute also projects every
  position onto the vocabulary although only position t is read. For ``base`` (V 32000) that
  projection is about 40% of a step's multiply-adds (D*V = 16.4M per position against about 22M for
  the 6 decoder layers), so a recompute that projected only position t would be about 1.6x cheaper;
  for ``tiny`` (V 32) it is about 5%.
- ``tiny`` has ``max_len`` 128; its position table is widened to the longest N (``max_len`` is not a
  parameter: the sinusoidal table is a constant, so the parameters are the same).

Timing: compilation is excluded (measured separately with ``jit(...).lower(...).compile()``). For each
(preset, N) the two methods run interleaved (cached, recompute, cached, recompute, ...) and the median
of the repeats is reported. A first run shorter than 1 s is a warm-up and is discarded. A method whose
single run takes longer than ``--case-budget-s`` / ``--repeats`` (90 s / 3) gets fewer repeats (at
least 1): on 2 CPU cores, ``base`` recompute at 512 tokens runs once (about 100 s). A method whose
runs are very short gets more repeats, up to a total of ``--min-time-s`` (at most 50 runs). The number
of runs actually timed is in the table and in the JSON (``repeats``, ``reduced_repeats``).

The model is untrained: at its initial scale it tends to repeat a few tokens, so the agreement check is
weaker than on a trained model; the JSON records how many distinct tokens were generated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxformer
from jaxformer import Transformer
from jaxformer.decoding.baselines import greedy_without_cache

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py
from common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    markdown_table,
    output_dir,
    timed,
    write_json,
)

START_ID, END_ID = 1, 2  # pad is 0; source ids are drawn from [3, V)
SOURCE_LENGTH, BATCH = 32, 1
WARMUP_BELOW_S = 1.0  # a first run shorter than this is discarded as a warm-up
METHODS = ("cached", "recompute")
MAX_REPEATS = 50  # for runs so short that --min-time-s asks for more than --repeats


def recompute_greedy(
    model: Transformer, params, src_ids, *, start_id: int, end_id: int, length: int
):
    """Greedy ids ``[B, length]`` without a KV cache (``jaxformer.decoding.baselines.greedy_without_cache``).

    Encoder once; then a ``lax.scan`` over ``length`` steps, where step t reruns the teacher-forced
    decoder over the whole padded buffer ``[B, length]`` and reads position t. ``min_length == length``
    gives exactly ``length`` tokens, as in the cached path.
    """
    return greedy_without_cache(
        model,
        params,
        src_ids,
        start_id=start_id,
        end_id=end_id,
        max_length=length,
        min_length=length,
    )


def cached_greedy(model: Transformer, params, src_ids, *, start_id: int, end_id: int, length: int):
    """Greedy ids ``[B, length]`` with the KV cache: ``jaxformer.generate``, exactly ``length`` tokens."""
    result = jaxformer.generate(
        model,
        params,
        src_ids,
        start_id=start_id,
        end_id=end_id,
        max_length=length,
        min_length=length,
    )
    return result.ids[:, 0]  # [B, W=1, T] -> [B, T]


def compile_method(method: str, model: Transformer, params, src_ids, length: int):
    """The AOT-compiled function ``(params, src_ids) -> ids [B, T]`` and its compile time in seconds."""
    fn = cached_greedy if method == "cached" else recompute_greedy
    jitted = jax.jit(lambda p, s: fn(model, p, s, start_id=START_ID, end_id=END_ID, length=length))
    start = time.perf_counter()
    compiled = jitted.lower(params, src_ids).compile()
    return compiled, time.perf_counter() - start


def first_mismatch(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first step (token index) at which two ``[B, T]`` id arrays differ in any row, or None."""
    differs = np.any(a != b, axis=0)  # [T]
    return int(np.argmax(differs)) if differs.any() else None


def mismatch_gap(model: Transformer, params, src_ids, ids: np.ndarray, other: np.ndarray, t: int):
    """How close to a tie the first disagreement was: the teacher-forced log-prob gap at step t.

    Both paths agree on the prefix before step t, so feeding that prefix to ``Transformer.decode``
    gives the logits both paths saw (up to float round-off); returns the largest gap over the batch
    between the log-probs of the two tokens they picked at step t.
    """
    variables = {"params": params}
    memory, valid = model.apply(variables, src_ids, method=Transformer.encode)  # [B, S, D], [B, S]
    prefix = jnp.concatenate(
        [jnp.full([ids.shape[0], 1], START_ID, jnp.int32), jnp.asarray(ids[:, :t], jnp.int32)], 1
    )  # [B, t+1]
    logits, _ = model.apply(variables, prefix, memory, valid, method=Transformer.decode)
    log_probs = np.asarray(jax.nn.log_softmax(logits[:, t], axis=-1))  # [B, V]
    rows = np.arange(ids.shape[0])
    return float(np.max(np.abs(log_probs[rows, ids[:, t]] - log_probs[rows, other[:, t]])))


def measure_case(
    model, params, src_ids, length: int, repeats: int, case_budget_s: float, min_time_s: float
) -> dict:
    """Compile both methods for one (preset, N), run them interleaved, compare their ids."""
    compiled, compile_s = {}, {}
    for method in METHODS:
        compiled[method], compile_s[method] = compile_method(method, model, params, src_ids, length)

    # First run of each: the ids to compare, a warm-up if short, else the first timed sample.
    ids, samples, wanted, warmup = {}, {m: [] for m in METHODS}, {}, {}
    for method in METHODS:
        out, seconds = timed(compiled[method], params, src_ids)
        ids[method] = np.asarray(out)
        warmup[method] = seconds < WARMUP_BELOW_S
        if not warmup[method]:
            samples[method].append(seconds)
        # Fewer repeats for runs too long for the budget (at least one); more for very short runs,
        # so that each method is timed for at least min_time_s in all (at most MAX_REPEATS runs).
        budgeted = max(1, min(repeats, math.floor(case_budget_s / seconds)))
        wanted[method] = max(budgeted, min(MAX_REPEATS, math.ceil(min_time_s / seconds)))

    for _ in range(max(wanted.values())):
        for method in METHODS:
            if len(samples[method]) < wanted[method]:
                samples[method].append(timed(compiled[method], params, src_ids)[1])

    mismatch = first_mismatch(ids["cached"], ids["recompute"])
    row = dict(
        tokens=length,
        # 1-minute load average after the case: well above the cores this run uses means that
        # other processes competed for the CPU during the timings.
        load_average=(load_average() or [None])[0],
        ids_agree=mismatch is None,
        agreeing_tokens=int(np.sum(np.all(ids["cached"] == ids["recompute"], axis=0))),
        agreeing_prefix=length if mismatch is None else mismatch,
        near_tie_log_prob_gap=(
            None
            if mismatch is None
            else mismatch_gap(model, params, src_ids, ids["cached"], ids["recompute"], mismatch)
        ),
        distinct_tokens=int(np.unique(ids["cached"]).size),
    )
    for method in METHODS:
        median_s = statistics.median(samples[method])
        row[method] = dict(
            ms_per_token=1e3 * median_s / length,
            median_s=median_s,
            times_s=samples[method],
            repeats=len(samples[method]),
            reduced_repeats=len(samples[method]) < repeats,  # cut by --case-budget-s
            first_run_discarded_as_warmup=warmup[method],
            compile_s=compile_s[method],
        )
    row["ratio"] = row["recompute"]["ms_per_token"] / row["cached"]["ms_per_token"]
    return row


def growth_slopes(rows: list[dict]) -> dict:
    """Slope of log(ms/token) against log(N) per (preset, method): ~0 flat, ~1 linear, ~2 quadratic."""
    slopes = {}
    for name in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == name]
        if len(mine) < 2:
            continue
        log_n = np.log([r["tokens"] for r in mine])
        slopes[name] = {
            m: float(np.polyfit(log_n, np.log([r[m]["ms_per_token"] for r in mine]), 1)[0])
            for m in METHODS
        }
    return slopes


TABLE_HEADERS = (
    "preset", "N", "ms/token cached", "ms/token recompute", "recompute/cached",
    "compile s (cached / recompute)", "repeats (c / r)", "ids agree",
)  # fmt: skip


def table_cells(r: dict) -> list:
    c, k = r["cached"], r["recompute"]
    return [
        r["preset"], r["tokens"], f"{c['ms_per_token']:.3f}", f"{k['ms_per_token']:.3f}",
        f"{r['ratio']:.1f}x", f"{c['compile_s']:.1f} / {k['compile_s']:.1f}",
        f"{c['repeats']} / {k['repeats']}",
        "yes" if r["ids_agree"] else f"no: {r['agreeing_tokens']}/{r['tokens']}",
    ]  # fmt: skip


def table(rows: list[dict]) -> str:
    return "\n".join(markdown_table(TABLE_HEADERS, "lrrrrrrl", map(table_cells, rows)))


def plot(rows: list[dict], path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.4))
    colors = {"cached": "tab:blue", "recompute": "tab:red"}
    markers = ["o", "s", "^", "D"]
    for i, name in enumerate(dict.fromkeys(r["preset"] for r in rows)):
        mine = [r for r in rows if r["preset"] == name]
        for method in METHODS:
            ax.plot(
                [r["tokens"] for r in mine],
                [r[method]["ms_per_token"] for r in mine],
                marker=markers[i % len(markers)],
                color=colors[method],
                linestyle="-" if method == "cached" else "--",
                label=f"{name}, {method}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({r["tokens"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("generated tokens N (batch 1, source 32)")
    ax.set_ylabel("ms per generated token (median)")
    ax.set_title(f"Greedy decoding with and without the KV cache ({jax.default_backend()})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument(
        "--case-budget-s",
        type=float,
        default=90.0,
        help="fewer repeats (at least 1) for a method whose run takes longer than this / repeats",
    )
    parser.add_argument(
        "--min-time-s",
        type=float,
        default=1.0,
        help=f"more repeats (at most {MAX_REPEATS}) for a method whose runs add up to less than this",
    )
    parser.add_argument("--out-dir", type=pathlib.Path, default=None, help=f"default {RESULTS_DIR}")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny only, lengths 8 16, 1 repeat; writes to a temp dir unless --out-dir is given",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.presets, args.lengths, args.repeats, args.min_time_s = ["tiny"], [8, 16], 1, 0.0
    args.out_dir = output_dir(args.out_dir, args.smoke, "kv_cache")
    if args.repeats < 1 or min(args.lengths) < 1:
        parser.error("--repeats and --lengths must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    """Measure every (preset, N), print the table and slopes, write the JSON and the PNG."""
    began = time.perf_counter()
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs", flush=True)
    rows, configs = [], {}
    for name in args.presets:
        preset_rows, configs[name] = measure_preset(name, args)
        rows += preset_rows
    slopes = growth_slopes(rows)
    reduced = reduced_repeats(rows, args.repeats)
    print_summary(rows, slopes, reduced)
    total_s = time.perf_counter() - began
    print(f"Total run time {total_s:.0f} s.")

    result = dict(
        experiment="kv_cache",
        question="Why cache? Time per generated token of greedy decoding, KV cache vs recompute.",
        command="python experiments/kv_cache.py " + " ".join(sys.argv[1:]),
        settings=settings(args),
        machine=machine_info(),
        configs=configs,
        rows=rows,
        slopes=slopes,
        reduced_repeats=reduced,
        all_ids_agree=all(r["ids_agree"] for r in rows),
        total_s=total_s,
    )
    json_path = write_json(args.out_dir / "kv_cache.json", result)
    png_path = args.out_dir / "kv_cache.png"
    plot(rows, png_path)
    print(f"Wrote {json_path} and {png_path}")
    return result


def measure_preset(name: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """One preset's rows, one per N, printed as they come; and its config with its parameter count."""
    config = jaxformer.preset(name)
    if max(args.lengths) > config.max_len:  # the position table only; the params are the same
        config = config.replace(max_len=max(args.lengths))
    model = Transformer(config)
    params = jaxformer.init_params(model, jax.random.key(0))
    src = jax.random.randint(jax.random.key(1), (BATCH, SOURCE_LENGTH), 3, config.vocab_size)
    record = dict(
        dataclasses.asdict(config),
        parameters=int(sum(x.size for x in jax.tree.leaves(params))),
    )
    rows = []
    for length in args.lengths:
        case = measure_case(
            model, params, src, length, args.repeats, args.case_budget_s, args.min_time_s
        )
        rows.append(dict(preset=name, **case))
        print_case(rows[-1])
    return rows, record


def print_case(row: dict) -> None:
    c, k = row["cached"], row["recompute"]
    print(
        f"  {row['preset']} N={row['tokens']}: cached {c['ms_per_token']:.3f} ms/token, recompute "
        f"{k['ms_per_token']:.3f} ms/token ({row['ratio']:.1f}x), repeats "
        f"{c['repeats']}/{k['repeats']}, ids agree: {row['ids_agree']}",
        flush=True,
    )
    if not row["ids_agree"]:
        print(
            f"  WARNING: ids differ from step {row['agreeing_prefix']} "
            f"({row['agreeing_tokens']}/{row['tokens']} tokens agree); log-prob gap at the first "
            f"difference {row['near_tie_log_prob_gap']:.3g} (a near-tie if tiny)",
            flush=True,
        )


def reduced_repeats(rows: list[dict], repeats: int) -> list[str]:
    """The methods timed fewer than ``repeats`` times (too slow for --case-budget-s), in words."""
    return [
        f"{r['preset']} {m} N={r['tokens']}: {r[m]['repeats']} repeat(s) "
        f"(one run takes {r[m]['times_s'][0]:.0f} s)"
        for r in rows
        for m in METHODS
        if r[m]["repeats"] < repeats
    ]


def print_summary(rows: list[dict], slopes: dict, reduced: list[str]) -> None:
    print("\n" + table(rows))
    print("\nGrowth of ms/token with N (slope of log ms/token against log N; 0 flat, 1 linear):")
    for name, s in slopes.items():
        print(f"  {name}: cached {s['cached']:+.2f}, recompute {s['recompute']:+.2f}")
    if reduced:
        print(
            "\nFewer repeats than asked (too slow for --case-budget-s):\n  " + "\n  ".join(reduced)
        )
    disagree = [r for r in rows if not r["ids_agree"]]
    print(
        "\nCached and recompute ids agree in every case."
        if not disagree
        else f"\nIds DIFFER in {len(disagree)} case(s); see 'agreeing_tokens' in the JSON."
    )


def settings(args: argparse.Namespace) -> dict:
    return dict(
        presets=args.presets,
        lengths=args.lengths,
        repeats=args.repeats,
        case_budget_s=args.case_budget_s,
        min_time_s=args.min_time_s,
        max_repeats=MAX_REPEATS,
        batch=BATCH,
        source_length=SOURCE_LENGTH,
        start_id=START_ID,
        end_id=END_ID,
        min_length="N (exactly N tokens)",
        params_seed=0,
        source_seed=1,
        warmup_below_s=WARMUP_BELOW_S,
        timing="median wall time of jit-compiled calls, compile excluded, interleaved",
        smoke=args.smoke,
    )


def main():
    run(parse_args())


if __name__ == "__main__":
    main()
