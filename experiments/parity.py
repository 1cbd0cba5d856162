"""Parity with the frameworks the imported models come from, per fixture: tables and a JSON file.

Command:  python experiments/parity.py [--out experiments/results/parity.json]

For every Hugging Face translation fixture (``tests/data/hf/*``: tiny models trained by
``tools/hf_goldens.py``) it loads the directory with ``load_pretrained`` and compares with the
outputs recorded from transformers and CTranslate2: the largest teacher-forced logit difference,
greedy rows identical to transformers', beam-4 rows (no length penalty) identical to CTranslate2's
and to transformers' (its beam search stops differently: reported, not asserted), and bfloat16's
top-1 agreement. Those fixtures recorded transformers' float32 logits only; the float64 reference
both float32 implementations are measured against is ``tests/reference_seq2seq.py`` (NumPy, float64,
the same weights): jaxformer's error and transformers' own.

For every decoder-only fixture (``tests/data/hf_lm/*``, ``tools/hf_lm_goldens.py``; transformers'
float64 logits recorded): the largest teacher-forced logit error against transformers' float64
and transformers' own float32 error, greedy rows identical to transformers' (the prompts as one
ragged batch), beam-4 rows identical to CTranslate2's ``Generator`` and to transformers', and the
tokenizer cases whose ids and decoded text are transformers'. No torch: the goldens are stored.

For every
OpenNMT-tf fixture (``tests/data/opennmt_tf/*``) the encoder and logit differences and, per decoding
case, the rows identical to OpenNMT-tf's in ``compat="opennmt-tf"`` and in the default mode. The
tests (``tests/interop/test_huggingface_models.py``, ``tests/interop/test_opennmt_tf_checkpoints.py``) assert the
thresholds; this script measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxformer
from jaxformer import Transformer
from jaxformer import decoding as dec

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "data" / "hf"
HF_LM = ROOT / "tests" / "data" / "hf_lm"
ONMT = ROOT / "tests" / "data" / "opennmt_tf"
sys.path.insert(0, str(ROOT / "tests"))  # the float64 NumPy reference of the translation models
from reference_seq2seq import numpy_seq2seq  # noqa: E402


def _arrays(directory: Path) -> dict[str, np.ndarray]:
    with np.load(directory / "arrays.npz") as arrays:  # closed: the file is not left open
        return dict(arrays)


def _rows(pre, sources, strategy, prefix, max_length=48):
    extra = {"target_prefix": [prefix] * len(sources)} if prefix else {}
    result = jaxformer.generate(
        pre.model, pre.params, sources, start_id=pre.start_id, end_id=pre.end_id,
        max_length=min(max_length, pre.config.max_len), strategy=strategy,
        suppress_ids=pre.generation.suppress_ids, **extra,
    )  # fmt: skip
    ids, lengths = np.asarray(result.ids), np.asarray(result.lengths)
    return [list(map(int, ids[b, 0, : lengths[b, 0]])) for b in range(len(sources))]


def huggingface(directory: Path) -> dict:
    g = json.loads((directory / "goldens.json").read_text())
    arrays = _arrays(directory)
    pre = jaxformer.load_pretrained(directory)
    src, tgt_in = jnp.asarray(g["src_ids"]), jnp.asarray(g["tgt_in_ids"])
    lengths = np.asarray([len(ids) for ids in g["target_ids"][: len(tgt_in)]])
    mask = np.arange(tgt_in.shape[1])[None] < lengths[:, None]
    logits = np.asarray(jax.jit(pre.model.apply)({"params": pre.params}, src, tgt_in))
    low = jaxformer.load_pretrained(directory, dtype="bfloat16")
    low_logits = np.asarray(jax.jit(low.model.apply)({"params": low.params}, src, tgt_in))
    if g.get("target_lang"):
        prefix = [pre.target_tokenizer.token_id(g["target_lang"])]
    elif pre.generation.forced_first_id is not None:
        prefix = [pre.generation.forced_first_id]
    else:
        prefix = []
    greedy = _rows(pre, g["source_ids"], dec.GreedySearch(), prefix)
    beam = _rows(pre, g["source_ids"], dec.BeamSearch(4), prefix)
    strip = lambda rows: [r[:-1] if r and r[-1] == pre.end_id else r for r in rows]
    same = lambda a, b: sum(x == y for x, y in zip(a, b, strict=True))
    hf_beam = g.get("beam_hf_lp0", g["beam_hf"])
    f64 = numpy_seq2seq(pre.config, pre.params, src, tgt_in)
    error = lambda x: np.abs(x.astype(np.float64) - f64)[mask]
    return {
        "model_type": json.loads((directory / "config.json").read_text())["model_type"],
        "rows": len(greedy),
        "logits_max_abs_diff": float(np.abs(logits - arrays["logits"])[mask].max()),
        "logits_max_abs": float(np.abs(arrays["logits"])[mask].max()),
        "logits_vs_f64_reference": float(error(logits).max()),
        "hf_f32_vs_f64_reference": float(error(arrays["logits"]).max()),
        "logits_vs_f64_reference_rms": float(np.sqrt((error(logits) ** 2).mean())),
        "hf_f32_vs_f64_reference_rms": float(np.sqrt((error(arrays["logits"]) ** 2).mean())),
        "greedy_identical_to_hf": same(greedy, strip(g["greedy"]["ids"])),
        "beam4_identical_to_ct2": same(beam, g["ct2"]["beam4"]["ids"]) if g["ct2"] else None,
        "beam4_identical_to_hf_lp0": same(beam, strip(hf_beam["ids"])),
        "bfloat16_top1_agreement": float((logits.argmax(-1) == low_logits.argmax(-1))[mask].mean()),
    }


LM_MAX_NEW = 20  # every recorded output ends within 16 new tokens
CT2_KNOWN_WRONG = ("llama",)  # CTranslate2 4.8.5 runs Llama 3's RoPE unscaled (README.hf_lm.md)


def _lm_rows(pre, g: dict, strategy) -> list[list[int]]:
    """The 16 prompts as one ragged batch: new ids with the EOS that ended each row."""
    result = jaxformer.generate(
        pre.model, pre.params, [p["ids"] for p in g["prompts"]], end_id=pre.end_id,
        max_length=LM_MAX_NEW, strategy=strategy,
    )  # fmt: skip
    ids, lengths = np.asarray(result.ids)[:, 0], np.asarray(result.lengths)[:, 0]
    return [list(map(int, ids[b, : lengths[b] + 1])) for b in range(len(ids))]


def huggingface_lm(directory: Path) -> dict:
    g = json.loads((directory / "goldens.json").read_text())
    a = _arrays(directory)
    pre = jaxformer.load_pretrained(directory)
    valid = a["attention_mask"].astype(bool)
    logits = jax.jit(pre.model.apply)(
        {"params": pre.params}, jnp.asarray(a["input_ids"]), jnp.asarray(valid)
    )
    error = lambda x: np.abs(np.asarray(x, np.float64) - a["logits_f64"])[valid]
    greedy = _lm_rows(pre, g, dec.GreedySearch())
    beam = _lm_rows(pre, g, dec.BeamSearch(4, length_penalty=0.0))
    same = lambda a, b: sum(x == y for x, y in zip(a, b, strict=True))
    tokenizer = pre.target_tokenizer
    cases = g["tokenizer_cases"]
    ours, theirs = error(logits), error(a["logits_f32"])
    return {
        "model_type": g["model_type"],
        "rows": len(greedy),
        "logits_vs_f64": float(ours.max()),
        "hf_f32_vs_f64": float(theirs.max()),
        "logits_vs_f64_rms": float(np.sqrt((ours**2).mean())),
        "hf_f32_vs_f64_rms": float(np.sqrt((theirs**2).mean())),
        "logits_max_abs": float(np.abs(a["logits_f64"][valid]).max()),
        "greedy_identical_to_hf": same(greedy, g["greedy"]["ids"]),
        "beam4_identical_to_ct2": same(beam, g["ct2"]["beam4"]["ids"]),
        "beam4_identical_to_hf": same(beam, g["beam_hf"]["ids"]),
        "beam4_reference": "hf" if directory.name in CT2_KNOWN_WRONG else "ct2",
        "tokenizer_cases": len(cases),
        "tokenizer_ids_equal": sum(tokenizer.encode(c["text"]) == c["ids"] for c in cases),
        "tokenizer_texts_equal": sum(tokenizer.decode(c["ids"]) == c["decoded"] for c in cases),
    }


def _hints(directory: Path, g: dict) -> dict:
    model = g["model"]
    hints = {"positions": "sinusoidal" if model["sinusoidal_positions"] else "none"}
    if "num_heads" in model.get("constructor_kwargs", {}):
        hints["num_heads"] = model["constructor_kwargs"]["num_heads"]
    return hints


def opennmt_tf(directory: Path) -> dict:
    g = json.loads((directory / "goldens.json").read_text())
    a = _arrays(directory)
    pre = jaxformer.load_pretrained(directory, **_hints(directory, g))
    variables = {"params": pre.params}
    src8 = jnp.asarray(a["src_ids"][: len(a["tgt_in_ids"])])
    encoded, valid = pre.model.apply(variables, src8, method=Transformer.encode)
    logits = jax.jit(pre.model.apply)(variables, src8, jnp.asarray(a["tgt_in_ids"]))
    mask = np.arange(a["tgt_in_ids"].shape[1])[None] < a["tgt_lengths"][:, None]
    out = {
        "encoder_max_abs_diff": float(np.abs(np.asarray(encoded) - a["encoder_output"])[np.asarray(valid)].max()),
        "encoder_max_abs": float(np.abs(a["encoder_output"]).max()),
        "logits_max_abs_diff": float(np.abs(np.asarray(logits) - a["logits"])[mask].max()),
        "logits_max_abs": float(np.abs(a["logits"][mask]).max()),
        "cases": {},
    }  # fmt: skip
    for case in g["decoding"]:
        e, name = case["effective"], case["name"]
        width = e["beam_width"]
        strategy = dec.GreedySearch() if width == 1 else dec.BeamSearch(
            width, length_penalty=float(e["length_penalty"]),
            coverage_penalty=float(e["coverage_penalty"]), num_hypotheses=width,
        )  # fmt: skip
        theirs = a[f"{name}/ids"]
        row = {}
        for compat in ("opennmt-tf", None):
            r = jaxformer.generate(
                pre.model, pre.params, jnp.asarray(a["src_ids"]), start_id=pre.start_id,
                end_id=pre.end_id, max_length=e["maximum_decoding_length"],
                min_length=e["minimum_decoding_length"], strategy=strategy, compat=compat,
            )  # fmt: skip
            ids = np.asarray(r.ids)[:, :, : theirs.shape[2]]
            same = (ids == theirs).all(axis=(1, 2)) & (
                np.asarray(r.lengths) == a[f"{name}/lengths"]
            ).all(axis=1)
            lp = float(np.abs(np.asarray(r.log_probs) - a[f"{name}/log_probs"]).max())
            key = compat or "default"
            row[key] = {"rows_identical": int(same.sum()), "log_probs_max_abs_diff": lp}
        row["rows"] = len(theirs)
        out["cases"][name] = row
    return out


def _count(same: int | None, rows: int) -> str:
    return "no conversion" if same is None else f"{same}/{rows}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "parity.json"))
    args = parser.parse_args()
    report = {"huggingface": {}, "huggingface_lm": {}, "opennmt_tf": {}}
    print(
        "| HF fixture | model_type | logits max abs diff | vs f64 ref: ours / HF f32's (rms) | greedy = HF | beam 4 = CT2 | beam 4 = HF (lp 0) | bf16 top-1 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for directory in sorted(p for p in HF.iterdir() if (p / "goldens.json").exists()):
        r = report["huggingface"][directory.name] = huggingface(directory)
        n = r["rows"]
        print(
            f"| {directory.name} | {r['model_type']} | {r['logits_max_abs_diff']:.1e} "
            f"(of {r['logits_max_abs']:.1f}) | {r['logits_vs_f64_reference']:.1e} / "
            f"{r['hf_f32_vs_f64_reference']:.1e} ({r['logits_vs_f64_reference_rms']:.1e} / "
            f"{r['hf_f32_vs_f64_reference_rms']:.1e}) | {r['greedy_identical_to_hf']}/{n} | "
            f"{_count(r['beam4_identical_to_ct2'], n)} | {r['beam4_identical_to_hf_lp0']}/{n} | "
            f"{r['bfloat16_top1_agreement']:.3f} |"
        )
    print(
        "\n| HF LM fixture | model_type | max abs logit - f64 | HF f32 - f64 | ratio | rms: ours / HF's | greedy = HF | beam 4 = CT2 | beam 4 = HF | tokenizer ids / texts |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for directory in sorted(p for p in HF_LM.iterdir() if (p / "goldens.json").exists()):
        r = report["huggingface_lm"][directory.name] = huggingface_lm(directory)
        n, k = r["rows"], r["tokenizer_cases"]
        mark = lambda key, r=r: " (reference)" if r["beam4_reference"] == key else ""
        print(
            f"| {directory.name} | {r['model_type']} | {r['logits_vs_f64']:.1e} (of "
            f"{r['logits_max_abs']:.1f}) | {r['hf_f32_vs_f64']:.1e} | "
            f"{r['logits_vs_f64'] / r['hf_f32_vs_f64']:.2f} | {r['logits_vs_f64_rms']:.1e} / "
            f"{r['hf_f32_vs_f64_rms']:.1e} | {r['greedy_identical_to_hf']}/{n} | "
            f"{r['beam4_identical_to_ct2']}/{n}{mark('ct2')} | {r['beam4_identical_to_hf']}/{n}"
            f"{mark('hf')} | {r['tokenizer_ids_equal']}/{k} / {r['tokenizer_texts_equal']}/{k} |"
        )
    print(
        "\n| OpenNMT-tf fixture | encoder max abs diff | logits max abs diff | case: compat rows identical (default mode) |"
    )
    print("|---|---:|---:|---|")
    for directory in sorted(p for p in ONMT.iterdir() if (p / "goldens.json").exists()):
        r = report["opennmt_tf"][directory.name] = opennmt_tf(directory)
        cases = "; ".join(
            f"{k}: {v['opennmt-tf']['rows_identical']}/{v['rows']} ({v['default']['rows_identical']})"
            for k, v in r["cases"].items()
        )
        print(
            f"| {directory.name} | {r['encoder_max_abs_diff']:.1e} (of {r['encoder_max_abs']:.1f}) | "
            f"{r['logits_max_abs_diff']:.1e} (of {r['logits_max_abs']:.1f}) | {cases} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
