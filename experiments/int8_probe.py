"""Can int8 make a decoder step faster than float32 on XLA:CPU? The matrix products of one step, timed.

Command:  python experiments/int8_probe.py          (2.5 to 3.5 minutes on 2 shared CPU cores)
          python experiments/int8_probe.py --smoke  (small shapes, a few seconds, into a temp dir)

Issue 17 asks for a weight-only int8 path, and int8 activations where XLA gives a faster product.
This probe measures the products alone, not jaxformer: the weight matrices that one incremental
decoder step of the ``base`` preset multiplies by (6 layers, each with the fused self-attention
``qkv`` D x 3D, its ``out`` D x D, the cross-attention ``query`` D x D and ``out`` D x D, the
feed-forward ``inner`` D x F and ``outer`` F x D; then the output projection D x V; D 512, F 2048,
V 32000; 38.4M weights, 154 MB in float32, 38 MB in int8). The cross-attention ``kv`` projection is
left out: a decoder step does not run it (``init_memory`` projects the encoder output once).
Each layer's weights are distinct arrays, so the step streams all of them from memory, as a real
step does. M = 1, 16, 64 rows (beams x batch) go through them as a chain: residual sums, a ReLU after
``inner``, an RMS normalisation per layer, and the largest logit feeds the next step, so no product
can be skipped or reordered. Attention over the cache, norms and softmax are not modelled.

The variants (the letters are the brief's):

- ``f32`` (a): float32 x float32 (the baseline).
- ``w8`` (b): weight-only int8. int8 weights with one float32 scale per output channel; inside the
  step ``(x @ w.astype(float32)) * scale``.
- ``a8w8`` (c): int8 x int8 -> int32 with ``lax.dot_general(..., preferred_element_type=int32)``; the
  activations are quantised per row on the fly (scale max|x| / 127), the int32 result is scaled back
  by the row's and the channel's scales.
- ``bf16`` (d): bfloat16 x bfloat16 with float32 accumulation (``preferred_element_type=float32``);
  the weights are stored in bfloat16, the activations rounded to it before each product.

Each runs ``--steps`` (32) steps inside one jit-compiled ``lax.scan``, so the per-call overhead is
amortised, in two forms:

- ``hoisted`` (suffix ``_hoisted``; ``f32`` itself): the weights are loop invariants, as the
  parameters are in jaxformer's jit-compiled decode loop. XLA's loop-invariant code motion then
  moves any conversion of the weights (int8 -> float32, or the int8 -> int32 and bfloat16 -> float32
  conversions XLA:CPU inserts itself where it has no native product for the dtypes) out of the loop:
  it runs once per call, and the loop reads the converted, 4-byte weights. This is what jaxformer
  would get by storing int8 parameters and dequantising them in its layers: per step it saves no
  memory traffic, and the conversion is paid once per call (here once per 32 steps).
- ``per_step`` (suffix ``_per_step``; ``f32_barrier`` for float32): the weights travel as a scan
  carry through ``lax.optimization_barrier`` together with the activations, so XLA cannot prove them
  invariant and converts them inside every step. This is the fair model of a loop that reads the
  compact weights at every step, as an int8 kernel would; whether it wins depends on the conversion
  being cheaper than the traffic it saves. ``f32_barrier`` is the control: the barrier and the carry
  alone (one copy of the weights into the loop per call) cost this much.

For each variant the compiled HLO is inspected (the ``hlo`` entry of each row): which dtypes the
loop's weight buffers have, how many weight-sized conversions run inside the loop and outside it,
and, by result dtype, the dots XLA:CPU hands to its YNNPACK library (``ynn_fusion``, with native
int8 x int8 -> int32 and bfloat16 products; this jaxlib does so for M >= 2 only) and those it
emits itself (after converting int8 or bfloat16 operands to int32 or float32).

Timing: compilation excluded (``jit(...).lower(...).compile()``, measured); one untimed call per
variant; then ``--rounds`` (5) interleaved rounds (every variant once per round, the order rotated
each round) per M; the median of the rounds divided by the steps is the time per decoder step. The
ratio is that median over ``f32``'s at the same M.

Arithmetic check: each format's product of each weight kind (layer 0's, and the output projection)
is compared with float32's on random rows, for each M: relative error ``||y - y_f32|| / ||y_f32||``
(``PRODUCT_TOLERANCE`` is what the test asks of the largest). And each timed program's state after
all its steps is compared with the ``f32`` program's (``scan_output_rel_err``; the rounding errors of
32 chained steps add up, so this one is larger and has no tolerance).

Writes ``experiments/results/int8_probe.json`` (every time, the HLO findings, the errors, the CPU's
int8/bfloat16 flags from ``/proc/cpuinfo``, ``XLA_FLAGS``, the machine) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # experiments/common.py
from common import RESULTS_DIR, load_average, machine_info, markdown_table, output_dir, write_json

BASE = dict(d_model=512, ffn_dim=2048, vocab_size=32000, layers=6)
SMOKE = dict(d_model=64, ffn_dim=256, vocab_size=1000, layers=1)
LAYER_KINDS = ("qkv", "self_out", "cross_query", "cross_out", "inner", "outer")
FORMATS = ("f32", "w8", "a8w8", "bf16")
VARIANTS = (
    "f32",
    "f32_barrier",
    "w8_hoisted",
    "w8_per_step",
    "a8w8_hoisted",
    "a8w8_per_step",
    "bf16_hoisted",
    "bf16_per_step",
)
# Largest relative error of a single product against float32 that the test accepts. Rounding a
# Gaussian weight column to 255 levels of its max |w| leaves about 0.8% relative error; rounding the
# activations too about doubles it; bfloat16 keeps 8 significant bits (about 0.3%).
PRODUCT_TOLERANCE = {"w8": 0.02, "a8w8": 0.03, "bf16": 0.01}
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx_vnni_int8",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
DN = (((1,), (0,)), ((), ()))  # [M, K] x [K, N]


# --- weights and products ----------------------------------------------------------------------------


def weight_shapes(d_model: int, ffn_dim: int, vocab_size: int, layers: int) -> dict[str, tuple]:
    """Every weight matrix of one decoder step, by name (``L0.qkv`` ... ``output``): [K, N]."""
    d, f = d_model, ffn_dim
    kinds = dict(
        qkv=(d, 3 * d),
        self_out=(d, d),
        cross_query=(d, d),
        cross_out=(d, d),
        inner=(d, f),
        outer=(f, d),
    )
    shapes = {f"L{i}.{kind}": kinds[kind] for i in range(layers) for kind in LAYER_KINDS}
    shapes["output"] = (d, vocab_size)
    return shapes


def make_weights(shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """Gaussian float32 weights with standard deviation K^-1/2 (fan-in scaling)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal((k, n), dtype=np.float32) * np.float32(k**-0.5))
        for name, (k, n) in shapes.items()
    }


def quantise_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (column): ``w ~ q * scale``, scale [1, N] = max|w| / 127."""
    scale = np.maximum(np.abs(w).max(axis=0, keepdims=True), np.float32(1e-12)) / np.float32(127)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def stored_weights(fmt: str, weights: dict[str, np.ndarray]) -> dict:
    """The weights as a format stores them: float32, (int8, scale) pairs, or bfloat16."""
    if fmt == "f32":
        return {k: jnp.asarray(w) for k, w in weights.items()}
    if fmt == "bf16":
        return {k: jnp.asarray(w, dtype=jnp.bfloat16) for k, w in weights.items()}
    pairs = {k: quantise_columns(w) for k, w in weights.items()}
    return {k: (jnp.asarray(q), jnp.asarray(s)) for k, (q, s) in pairs.items()}


def product(fmt: str) -> Callable:
    """``prod(x [M, K] float32, stored weight) -> [M, N] float32`` of a format."""
    if fmt == "f32":
        return lambda x, w: x @ w
    if fmt == "w8":
        return lambda x, w: (x @ w[0].astype(jnp.float32)) * w[1]
    if fmt == "bf16":
        return lambda x, w: lax.dot_general(
            x.astype(jnp.bfloat16), w, DN, preferred_element_type=jnp.float32
        )

    def a8w8(x, w):
        row_scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-12) / 127.0
        xq = jnp.clip(jnp.round(x / row_scale), -127, 127).astype(jnp.int8)
        acc = lax.dot_general(xq, w[0], DN, preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * row_scale * w[1]

    return a8w8


def decoder_step(prod: Callable, weights: dict, x, layers: int):
    """The chain of one step's products: ``x [M, D] -> (x for the next step, logits [M, V])``."""
    d = x.shape[-1]
    for i in range(layers):
        w = lambda kind, i=i: weights[f"L{i}.{kind}"]
        t = prod(x, w("qkv"))
        x = x + prod(t[:, :d] + t[:, d : 2 * d] + t[:, 2 * d :], w("self_out"))
        x = x + prod(prod(x, w("cross_query")), w("cross_out"))
        x = x + prod(jax.nn.relu(prod(x, w("inner"))), w("outer"))
        x = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    logits = prod(x, weights["output"])
    return x + 0.01 * jnp.tanh(jnp.max(logits, axis=-1, keepdims=True)), logits


def scanned(fmt: str, layers: int, steps: int, barrier: bool) -> Callable:
    """``f(x, weights) -> (x, sum of the largest logits)`` after ``steps`` decoder steps in one scan."""
    prod = product(fmt)

    def run(x, weights):
        def step(x, w):
            x, logits = decoder_step(prod, w, x, layers)
            return x, jnp.max(logits)

        if barrier:  # the weights are a carry that XLA can no longer prove loop-invariant

            def body(carry, _):
                x, top = step(*carry)
                return lax.optimization_barrier((x, carry[1])), top

            (x, _), tops = lax.scan(body, (x, weights), None, length=steps)
        else:  # the weights are loop invariants, closed over
            x, tops = lax.scan(lambda x, _: step(x, weights), x, None, length=steps)
        return x, jnp.sum(tops)

    return jax.jit(run)


def variant_format(variant: str) -> tuple[str, bool]:
    """``(format, weights carried through the barrier)`` of a variant name."""
    if variant == "f32":
        return "f32", False
    if variant == "f32_barrier":
        return "f32", True
    fmt, _, form = variant.partition("_")
    return fmt, form == "per_step"


# --- what the compiled HLO does ------------------------------------------------------------------------


def hlo_computations(text: str) -> dict[str, list[str]]:
    """The lines of each computation of an HLO module's text, by name."""
    comps, name = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def reachable(comps: dict[str, list[str]], roots: list[str]) -> set[str]:
    called = re.compile(r"(?:calls|body|condition|to_apply)=\{?%([\w.\-]+)")
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo.extend(m for line in comps[name] for m in called.findall(line))
    return seen


def hlo_summary(text: str, shapes: set[tuple[int, int]]) -> dict:
    """Where a compiled scan converts its weights, what dtype the loop reads them in, who does the dots.

    ``shapes``: the [K, N] of the weights (a conversion to one of those shapes is a weight's).
    """
    comps = hlo_computations(text)
    loops = [re.search(r"body=%([\w.\-]+)", line) for c in comps.values() for line in c]
    bodies = [m.group(1) for m in loops if m]
    inside = reachable(comps, bodies)
    array = r"(\w+)\[(\d+),(\d+)\]"
    converts = Counter()
    for name, lines in comps.items():
        for line in lines:
            m = re.search(r"= " + array + r"\{[\d,]*\} convert\(", line)
            if m and (int(m.group(2)), int(m.group(3))) in shapes:
                converts["in_loop" if name in inside else "outside_loop"] += 1
    loop_dtypes = Counter()
    for lines in comps.values():
        for line in lines:
            m = re.search(r"= \((.*?)\) while\(", line)
            if m:
                for dtype, k, n in re.findall(array, m.group(1)):
                    if (int(k), int(n)) in shapes:
                        loop_dtypes[dtype] += 1
    # XLA:CPU hands some ops to its YNNPACK library as ``ynn_fusion`` custom fusions (reductions as
    # well as dots); a dot inside one is YNNPACK's, any other dot is XLA's own.
    ynn = {
        m.group(1)
        for lines in comps.values()
        for line in lines
        if (m := re.search(r"%ynn_fusion[\w.\-]* = .*calls=%([\w.\-]+)", line))
    }
    dots = {"ynn": Counter(), "xla": Counter()}
    for name, lines in comps.items():
        for line in lines:
            if m := re.search(r"= (\w+)\[[\d,]*\]\{[\d,]*\} dot\(", line):
                dots["ynn" if name in ynn else "xla"][m.group(1)] += 1
    return dict(
        loops=len(bodies),
        weight_dtypes_in_loop=dict(loop_dtypes),
        weight_converts_in_loop=converts["in_loop"],
        weight_converts_outside_loop=converts["outside_loop"],
        ynn_dots=dict(dots["ynn"]),  # result dtype -> count
        xla_dots=dict(dots["xla"]),
    )


# --- the machine ----------------------------------------------------------------------------------------


def cpu_flags() -> dict[str, bool]:
    """Which of ``CPU_FLAGS`` ``/proc/cpuinfo`` lists (all False where there is no such file)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return dict.fromkeys(CPU_FLAGS, False)
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return {flag: flag in present for flag in CPU_FLAGS}


# --- accuracy -------------------------------------------------------------------------------------------


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def accuracy(stored: dict[str, dict], ms: list[int], seed: int = 1) -> dict:
    """Each format's products (layer 0's kinds and ``output``) against float32, for each row count M
    (XLA:CPU picks a different dot for M = 1 than for more rows)."""
    names = [f"L0.{kind}" for kind in LAYER_KINDS] + ["output"]
    weights = {fmt: {n: stored[fmt][n] for n in names} for fmt in FORMATS}
    everything = jax.jit(
        lambda inputs, weights: {
            fmt: {n: product(fmt)(inputs[n], weights[fmt][n]) for n in names} for fmt in FORMATS
        }
    )
    by_m = {fmt: {} for fmt in FORMATS[1:]}
    for m in ms:
        rng = np.random.default_rng([seed, m])
        inputs = {}
        for name in names:
            x = rng.standard_normal((m, stored["f32"][name].shape[0]), dtype=np.float32)
            inputs[name] = np.maximum(x, 0) if name.endswith("outer") else x  # reads ReLU output
        out = everything(inputs, weights)
        for fmt in FORMATS[1:]:
            by_m[fmt][m] = {n: rel_err(out[fmt][n], out["f32"][n]) for n in names}
    return {
        fmt: dict(
            max_product_rel_err=max(max(errors.values()) for errors in found.values()),
            tolerance=PRODUCT_TOLERANCE[fmt],
            product_rel_err_by_m=found,
        )
        for fmt, found in by_m.items()
    }


# --- the run --------------------------------------------------------------------------------------------


def measure_m(m: int, args, stored: dict[str, dict], shapes: set) -> list[dict]:
    """Compile every variant for M rows, then time them in interleaved rounds."""
    x = jnp.asarray(
        np.random.default_rng(m).standard_normal((m, args.shape["d_model"]), np.float32)
    )
    compiled, rows = {}, {}
    for variant in args.variants:
        fmt, barrier = variant_format(variant)
        fn = scanned(fmt, args.shape["layers"], args.steps, barrier)
        start = time.perf_counter()
        exe = fn.lower(x, stored[fmt]).compile()
        compile_s = time.perf_counter() - start
        final_x, _ = jax.block_until_ready(exe(x, stored[fmt]))  # untimed first call
        compiled[variant] = exe
        rows[variant] = dict(
            m=m,
            variant=variant,
            format=fmt,
            compile_s=compile_s,
            times_s=[],
            hlo=hlo_summary(exe.as_text(), shapes),
            final_x=np.asarray(final_x),
        )
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for variant in order:
            fmt, _ = variant_format(variant)
            start = time.perf_counter()
            jax.block_until_ready(compiled[variant](x, stored[fmt]))
            rows[variant]["times_s"].append(time.perf_counter() - start)
    base = statistics.median(rows["f32"]["times_s"]) if "f32" in rows else None
    reference = rows["f32"]["final_x"] if "f32" in rows else None
    for row in rows.values():
        # The timed program's own arithmetic: its state after all the steps against float32's.
        final_x = row.pop("final_x")
        row["scan_output_rel_err"] = None if reference is None else rel_err(final_x, reference)
        median = statistics.median(row["times_s"])
        row["ms_per_step"] = 1e3 * median / args.steps
        row["ratio_to_f32"] = median / base if base else None
    return list(rows.values())


def table(rows: list[dict]) -> str:
    """Markdown: M, variant, ms per step (median), ratio to f32, loop's weight dtypes, dots."""
    cells = []
    for r in rows:
        h = r["hlo"]
        dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(h["weight_dtypes_in_loop"].items()))
        converts = f"{h['weight_converts_in_loop']} / {h['weight_converts_outside_loop']}"
        ratio = "" if r["ratio_to_f32"] is None else f"{r['ratio_to_f32']:.2f}"
        dots = "; ".join(
            f"{lib} " + ", ".join(f"{k} x{v}" for k, v in sorted(h[f"{lib}_dots"].items()))
            for lib in ("xla", "ynn")
            if h[f"{lib}_dots"]
        )
        cells.append(
            (r["m"], r["variant"], f"{r['ms_per_step']:.3f}", ratio, dtypes or "-", converts, dots)
        )
    headers = ("M", "variant", "ms/step", "/ f32", "weights in loop", "converts in/out", "dots")
    return "\n".join(markdown_table(headers, "rlrrlll", cells))


def run(args) -> dict:
    start = time.perf_counter()
    load_before = load_average()
    shape_of = weight_shapes(**args.shape)
    shapes = set(shape_of.values())
    weights = make_weights(shape_of)
    stored = {fmt: stored_weights(fmt, weights) for fmt in FORMATS}
    acc = accuracy(stored, args.ms)
    rows = []
    for m in args.ms:
        rows.extend(measure_m(m, args, stored, shapes))
    result = dict(
        settings=dict(
            shape=args.shape,
            weights=len(shape_of),
            parameters=int(sum(k * n for k, n in shape_of.values())),
            ms=args.ms,
            steps=args.steps,
            rounds=args.rounds,
            variants=list(args.variants),
            smoke=args.smoke,
        ),
        rows=rows,
        accuracy=acc,
        cpu_flags=cpu_flags(),
        xla_flags=os.environ.get("XLA_FLAGS"),
        machine=machine_info(),
        load_average=dict(before=load_before, after=load_average()),
        total_s=time.perf_counter() - start,
    )
    write_json(args.out_dir / "int8_probe.json", result)
    print(table(rows))
    print()
    for fmt, a in acc.items():
        scan_errs = [r["scan_output_rel_err"] for r in rows if r["format"] == fmt]
        scan = f"; state after {args.steps} steps {max(scan_errs):.4f} (largest over M)"
        print(
            f"{fmt}: largest product error {a['max_product_rel_err']:.4f} (tolerance "
            f"{a['tolerance']}){scan if scan_errs else ''}"
        )
    flags = ", ".join(k for k, v in result["cpu_flags"].items() if v) or "none"
    print(f"CPU flags: {flags}; XLA_FLAGS={result['xla_flags']!r}")
    print(f"load average {load_before} -> {result['load_average']['after']}")
    print(f"wrote {args.out_dir / 'int8_probe.json'} in {result['total_s']:.1f} s")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ms", nargs="+", type=int, default=[1, 16, 64], help="rows per step")
    parser.add_argument("--steps", type=int, default=32, help="decoder steps per scan (per call)")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per variant (median)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out-dir", type=pathlib.Path, default=None, help=f"default {RESULTS_DIR}")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="D 64, F 256, V 1000, 2 layers, M 1 and 4, 4 steps, 2 rounds; writes to a temp dir "
        "unless --out-dir is given",
    )
    args = parser.parse_args(argv)
    args.shape = dict(BASE)
    if args.smoke:
        args.shape, args.ms, args.steps, args.rounds = dict(SMOKE), [1, 4], 4, 2
    if "f32" not in args.variants:
        args.variants = ["f32", *args.variants]  # the ratios need the baseline
    args.out_dir = output_dir(args.out_dir, args.smoke, "int8_probe")
    if args.steps < 1 or args.rounds < 1 or min(args.ms) < 1:
        parser.error("--steps, --rounds and --ms must be >= 1")
    return args


def main():
    run(parse_args())


if __name__ == "__main__":
    main()
