"""Golden outputs of `repetition_penalty` and `no_repeat_ngram_size` on the tiny decoder-only LMs.

Run by hand in the throwaway venv of hf_lm_goldens.py (never in CI); see tools/README.hf_lm.md:

    /tmp/hflmvenv/bin/python tools/hf_lm_options_goldens.py [--only NAME[,NAME...]] [--out DIR]

Nothing is trained: each stored fixture directory tests/data/hf_lm/NAME/ is loaded as saved (in
float32: gemma's bfloat16 and llama_linear's float16 weights upcast, as hf_lm_goldens.py computes
its goldens) and its 16 stored prompts (goldens.json `prompts[i].ids`) are generated from with
Hugging Face `model.generate` and CTranslate2 `Generator.generate_batch` under each setting of
SETTINGS. The outputs go to OUT/NAME/options.json (OUT defaults to tests/data/hf_lm, the fixture
directories themselves; only options.json is written there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_lm_goldens import (
    MAX_NEW_TOKENS,
    MODELS,
    convention_variants,
    cut_after_eos,
    pad_left,
    versions,
)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "hf_lm")
BEAM = dict(num_beams=4, length_penalty=0.0, early_stopping=False, num_return_sequences=1)

# name -> the options of the setting: `beam` (1: greedy, 4: beam search with BEAM), then
# `repetition_penalty` and / or `no_repeat_ngram_size`. The names are the keys of options.json.
# The first nine are the settings asked for; on these peaked models that never repeat a token
# along their outputs most of them change few or no rows (a penalty above 1 can only change an
# output whose plain path emits a token already seen; see the README), so stronger settings
# follow that do:
# a penalty below 1 (0.2: a reward, the same formula the other way), n-gram size 1 in beams,
# a penalty of 10 in beams, and the n-gram ban on top of the reward (the reward makes every
# family repeat, so the ban bites on the word-level tokenizers too).
SETTINGS = {
    "greedy_rp1.3": dict(beam=1, repetition_penalty=1.3),
    "greedy_rp2.0": dict(beam=1, repetition_penalty=2.0),
    "greedy_rp10.0": dict(beam=1, repetition_penalty=10.0),
    "greedy_ngram1": dict(beam=1, no_repeat_ngram_size=1),
    "greedy_ngram2": dict(beam=1, no_repeat_ngram_size=2),
    "greedy_ngram3": dict(beam=1, no_repeat_ngram_size=3),
    "beam4_rp2.0": dict(beam=4, repetition_penalty=2.0),
    "beam4_ngram2": dict(beam=4, no_repeat_ngram_size=2),
    "greedy_rp1.3_ngram2": dict(beam=1, repetition_penalty=1.3, no_repeat_ngram_size=2),
    # stronger
    "greedy_rp0.2": dict(beam=1, repetition_penalty=0.2),
    "greedy_rp0.2_ngram2": dict(beam=1, repetition_penalty=0.2, no_repeat_ngram_size=2),
    "beam4_rp10.0": dict(beam=4, repetition_penalty=10.0),
    "beam4_rp0.2": dict(beam=4, repetition_penalty=0.2),
    "beam4_ngram1": dict(beam=4, no_repeat_ngram_size=1),
    "beam4_rp0.2_ngram2": dict(beam=4, repetition_penalty=0.2, no_repeat_ngram_size=2),
}


def option_kwargs(setting):
    return {k: v for k, v in setting.items() if k != "beam"}


def hf_kwargs(setting):
    kw = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    kw.update(BEAM if setting["beam"] > 1 else dict(num_beams=1))
    kw.update(option_kwargs(setting))
    return kw


def ct2_options(setting, end_tokens):
    return dict(
        beam_size=setting["beam"],
        length_penalty=0.0,
        repetition_penalty=float(setting.get("repetition_penalty", 1.0)),
        no_repeat_ngram_size=int(setting.get("no_repeat_ngram_size", 0)),
        include_prompt_in_result=False,
        max_length=MAX_NEW_TOKENS,
        return_scores=True,
        return_end_token=True,
        end_token=list(end_tokens),
        max_batch_size=0,
    )


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------


def hf_run(model, prompt_ids, ids, kwargs, logits_processor=None):
    """generate on the prompts in one left-padded batch: the new ids (cut after the first EOS,
    kept), and the scores HF reports: for greedy the per-step processed scores of the chosen
    tokens summed (`scores`, processed logits) and the log-softmax of those processed scores at
    the chosen tokens summed (`log_probs`), and the smallest top-1 minus top-2 processed score
    along each row (`min_margin`); for beam search `sequences_scores`."""
    x, m = pad_left(prompt_ids, ids["gen_pad"])
    extra = {} if logits_processor is None else dict(logits_processor=logits_processor)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(x),
            attention_mask=torch.tensor(m),
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
            **extra,
        )
    rows = [cut_after_eos(r, ids) for r in out.sequences[:, x.shape[1] :].tolist()]
    res = dict(ids=rows)
    if kwargs["num_beams"] == 1:
        steps = torch.stack(out.scores, 1).double()  # [B, steps, V] processed scores
        lsm = torch.log_softmax(steps, -1)
        res["scores"] = [
            sum(float(steps[b, t, i]) for t, i in enumerate(r)) for b, r in enumerate(rows)
        ]
        res["log_probs"] = [
            sum(float(lsm[b, t, i]) for t, i in enumerate(r)) for b, r in enumerate(rows)
        ]
        # the decision margin: top-1 minus top-2 processed score, the smallest along the row
        top2 = steps.topk(2, -1).values
        gap = top2[..., 0] - top2[..., 1]
        res["min_margin"] = [round(float(gap[b, : len(r)].min()), 4) for b, r in enumerate(rows)]
    else:
        res["sequences_scores"] = out.sequences_scores.tolist()
    return res


class GeneratedOnly:
    """A processor applied to the generated tokens only (the prompt cut off): what CTranslate2
    does per prompt, run inside HF greedy (one prompt, no padding) to check that reading."""

    def __init__(self, inner, prompt_len):
        self.inner, self.prompt_len = inner, prompt_len

    def __call__(self, input_ids, scores):
        return self.inner(input_ids[:, self.prompt_len :], scores)


def hf_generated_only(model, p, ids, setting):
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    procs = LogitsProcessorList()
    if "repetition_penalty" in setting:
        procs.append(
            RepetitionPenaltyLogitsProcessor(
                setting["repetition_penalty"], prompt_ignore_length=len(p)
            )
        )
    if "no_repeat_ngram_size" in setting:
        procs.append(
            GeneratedOnly(NoRepeatNGramLogitsProcessor(setting["no_repeat_ngram_size"]), len(p))
        )
    kw = hf_kwargs({"beam": 1})
    return hf_run(model, [p], ids, kw, logits_processor=procs)


# --------------------------------------------------------------------------------------------
# CTranslate2
# --------------------------------------------------------------------------------------------


class Ct2:
    def __init__(self, model_dir, tok):
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        self.tmp = tempfile.mkdtemp(prefix="ct2_")
        out = os.path.join(self.tmp, "model")
        TransformersConverter(model_dir).convert(out, quantization=None)
        self.gen = ctranslate2.Generator(
            out, device="cpu", compute_type="float32", inter_threads=1, intra_threads=1
        )
        self.tok = tok

    def run(self, prompt_ids, opts):
        tokens = [self.tok.convert_ids_to_tokens(p) for p in prompt_ids]
        res = self.gen.generate_batch(tokens, **opts)
        return dict(
            ids=[list(r.sequences_ids[0]) for r in res], scores=[float(r.scores[0]) for r in res]
        )

    def close(self):
        del self.gen
        shutil.rmtree(self.tmp)


# --------------------------------------------------------------------------------------------
# The formulas as read from the sources, rescored teacher-forced: each framework's reported
# score of each output must be this sum (checks where and on which ids the options act)
# --------------------------------------------------------------------------------------------


def penalise(z, hist, penalty):
    """RepetitionPenaltyLogitsProcessor / CTranslate2 RepetitionPenalty: each distinct id of
    `hist`, once: a score below 0 times the penalty, otherwise divided by it."""
    z = z.clone()
    if hist:
        i = torch.tensor(sorted(set(hist)))
        v = z[i]
        z[i] = torch.where(v < 0, v * penalty, v / penalty)
    return z


def banned(seq, n):
    """NoRepeatNGramLogitsProcessor / CTranslate2 NoRepeatNgram: the ids that would complete an
    n-gram already in `seq` (the tokens after each earlier occurrence of its last n-1 ids; n=1:
    every id of `seq`)."""
    if len(seq) < n:
        return set()
    prefix = seq[len(seq) - n + 1 :]
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == prefix}


def formula_score(model, p, row, setting, on, history):
    """The sum over the new tokens of the processed score of the chosen token. `on`: "logits"
    (processors on the raw logits, then log-softmax) or "log_probs" (log-softmax, then the
    processors; no renormalisation); `history(t)`: the ids the processors see before new
    token t."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + row])).logits[0].double()
    total = 0.0
    for t, tok in enumerate(row):
        z = logits[len(p) - 1 + t]
        if on == "log_probs":
            z = torch.log_softmax(z, -1)
        hist = history(t)
        if "repetition_penalty" in setting:
            z = penalise(z, hist, setting["repetition_penalty"])
        if "no_repeat_ngram_size" in setting:
            ban = banned(hist, setting["no_repeat_ngram_size"])
            assert tok not in ban
            if ban:
                z[torch.tensor(sorted(ban))] = -float("inf")
        if on == "logits":
            z = torch.log_softmax(z, -1)
        total += float(z[tok])
    return total


def formula_error(model, prompts, rows, scores, setting, on, seen):
    """max |reported - formula| over the rows; seen(i, p, row, t) -> the ids seen."""
    err = 0.0
    for i, (p, row, sc) in enumerate(zip(prompts, rows, scores, strict=True)):
        f = formula_score(
            model, p, row, setting, on, lambda t, i=i, p=p, row=row: seen(i, p, row, t)
        )
        err = max(err, abs(f - sc))
    return round(err, 6)


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


def differ(a, b):
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def ends(rows, ids):
    return sum(1 for r in rows if r and r[-1] in ids["eos"])


def one(name, root, log):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.join(DATA, name)
    with open(os.path.join(d, "goldens.json")) as f:
        g = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    prompts = [p["ids"] for p in g["prompts"]]
    end_tokens = g["ct2"]["beam1"]["options"]["end_token"]
    ids = dict(eos=g["eos_ids"], gen_pad=g["pad_id"])
    assert tok.convert_tokens_to_ids(end_tokens) == g["eos_ids"]
    ct2 = Ct2(d, tok)
    # the model CTranslate2 runs, for the checks of its outputs: CTranslate2 4.8.5 does not
    # apply Llama 3's RoPE scaling (README.hf_lm.md), so for `llama` the same weights without it
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    ct2_ref_name = "without_rope_scaling" if rope.get("rope_type") == "llama3" else "hf"
    ct2_ref = model if ct2_ref_name == "hf" else convention_variants(model)[ct2_ref_name]

    # the plain runs, recomputed: they must be the stored goldens
    base_hf = {
        1: hf_run(model, prompts, ids, hf_kwargs({"beam": 1}))["ids"],
        4: hf_run(model, prompts, ids, hf_kwargs({"beam": 4}))["ids"],
    }
    assert base_hf[1] == g["greedy"]["ids"], name
    assert base_hf[4] == g["beam_hf"]["ids"], name
    base_ct2 = {b: ct2.run(prompts, ct2_options({"beam": b}, end_tokens))["ids"] for b in (1, 4)}
    assert base_ct2[1] == g["ct2"]["beam1"]["ids"], name
    assert base_ct2[4] == g["ct2"]["beam4"]["ids"], name

    hf_out, ct2_out, report = {}, {}, {}
    m = min(len(p) for p in prompts)  # CTranslate2 forwards the first m - 1 ids of each prompt
    for key, s in SETTINGS.items():
        kw = hf_kwargs(s)
        h = hf_run(model, prompts, ids, kw)
        h_single_runs = [hf_run(model, [p], ids, kw) for p in prompts]
        h_single = [x["ids"][0] for x in h_single_runs]
        opts = ct2_options(s, end_tokens)
        c = ct2.run(prompts, opts)
        c_single_runs = [ct2.run([p], opts) for p in prompts]
        c_single = [x["ids"][0] for x in c_single_runs]
        hf_out[key] = dict(
            kwargs=kw,
            ids=h["ids"],
            texts=tok.batch_decode(h["ids"], skip_special_tokens=True),
            **{k: v for k, v in h.items() if k != "ids"},
            single_differ={str(i): h_single[i] for i in differ(h["ids"], h_single)},
        )
        ct2_out[key] = dict(
            options=opts,
            ids=c["ids"],
            scores=c["scores"],
            single_differ={str(i): c_single[i] for i in differ(c["ids"], c_single)},
        )
        base_h, base_c = base_hf[s["beam"]], base_ct2[s["beam"]]
        r = dict(
            hf_changed=len(differ(h["ids"], base_h)),
            hf_single_changed=len(differ(h_single, base_h)),
            ct2_changed=len(differ(c["ids"], base_c)),
            ct2_single_changed=len(differ(c_single, base_c)),
            hf_batched_vs_single_differ=differ(h["ids"], h_single),
            ct2_batched_vs_single_differ=differ(c["ids"], c_single),
            hf_vs_ct2_equal=16 - len(differ(h["ids"], c["ids"])),
            hf_single_vs_ct2_single_equal=16 - len(differ(h_single, c_single)),
            hf_ended_with_eos=ends(h["ids"], ids),
            ct2_ended_with_eos=ends(c["ids"], ids),
        )
        # the formulas: HF sees the prompt (BOS included) and the new tokens, on the logits in
        # greedy and on the log-probs in beam search; CTranslate2 the new tokens only (per
        # prompt) or also the prompt's tokens past the batch's shortest prompt (batched), on
        # the logits in both
        hf_on = "logits" if s["beam"] == 1 else "log_probs"
        hf_key = "log_probs" if s["beam"] == 1 else "sequences_scores"
        r["formula_max_abs_hf_single"] = formula_error(
            model,
            prompts,
            h_single,
            [x[hf_key][0] for x in h_single_runs],
            s,
            hf_on,
            lambda i, p, row, t: p + row[:t],
        )
        r["formula_max_abs_ct2_single"] = formula_error(
            ct2_ref,
            prompts,
            c_single,
            [x["scores"][0] for x in c_single_runs],
            s,
            "logits",
            lambda i, p, row, t: row[:t],
        )
        r["formula_max_abs_ct2_batched"] = formula_error(
            ct2_ref,
            prompts,
            c["ids"],
            c["scores"],
            s,
            "logits",
            lambda i, p, row, t: p[m:] + row[:t],
        )
        if ct2_ref is not model:
            r["formula_max_abs_ct2_batched_hf_model"] = formula_error(
                model,
                prompts,
                c["ids"],
                c["scores"],
                s,
                "logits",
                lambda i, p, row, t: p[m:] + row[:t],
            )
        same = [i for i in range(len(prompts)) if h["ids"][i] == c["ids"][i]]
        hs = h["log_probs"] if s["beam"] == 1 else h["sequences_scores"]
        if same:
            r["hf_vs_ct2_max_score_diff_equal_rows"] = round(
                max(abs(hs[i] - c["scores"][i]) for i in same), 6
            )
        if s["beam"] == 1:
            # HF run with CTranslate2's reading (processors on the generated tokens only), one
            # prompt at a time, on the model CTranslate2 runs: must equal CTranslate2 per prompt
            go = [hf_generated_only(ct2_ref, p, ids, s) for p in prompts]
            go_ids = [x["ids"][0] for x in go]
            r["hf_generated_only_vs_ct2_single_equal"] = 16 - len(differ(go_ids, c_single))
            r["hf_generated_only_changed"] = len(differ(go_ids, base_h))
            r["hf_generated_only_min_margin"] = [x["min_margin"][0] for x in go]
            cs = [x["scores"][0] for x in c_single_runs]
            same = [i for i in range(16) if go_ids[i] == c_single[i]]
            if same:
                r["hf_generated_only_vs_ct2_single_max_score_diff"] = round(
                    max(abs(go[i]["log_probs"][0] - cs[i]) for i in same), 6
                )
        report[key] = r
        log(f"[{name}] {key}: {r}")
    ct2.close()

    doc = dict(
        name=name,
        generator="tools/hf_lm_options_goldens.py",
        versions=versions(),
        source="goldens.json of this directory: prompts[i].ids, eos_ids, pad_id; the model "
        "loaded as saved with AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)",
        max_new_tokens=MAX_NEW_TOKENS,
        eos_ids=g["eos_ids"],
        pad_id=g["pad_id"],
        prompt_ids=prompts,
        settings=SETTINGS,
        baseline="goldens.json `greedy` / `beam_hf` (HF) and `ct2.beam1` / `ct2.beam4` "
        "(CTranslate2): recomputed here and checked equal",
        ct2_reference_model=ct2_ref_name,
        hf=hf_out,
        ct2=ct2_out,
        report=report,
    )
    out_dir = os.path.join(root, name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "options.json"), "w") as f:
        f.write(dumps(doc))
        f.write("\n")
    return report


def _flat(v):
    return not isinstance(v, dict | list | tuple) or (
        isinstance(v, list | tuple) and all(not isinstance(x, dict | list | tuple) for x in v)
    )


def dumps(obj, indent=0):
    """JSON with one level of indentation per nesting level; lists of scalars, and objects whose
    values are scalars or lists of scalars, on one line each; floats rounded to 1e-6."""
    pad = " " * (indent + 1)
    if isinstance(obj, float):
        return json.dumps(round(obj, 6))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        if all(_flat(v) for v in obj.values()) and len(obj) <= 12:
            return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in obj.items()) + "}"
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list | tuple):
        if all(not isinstance(v, dict | list | tuple) for v in obj):
            return "[" + ", ".join(dumps(v) for v in obj) + "]"
        items = [pad + dumps(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(obj, ensure_ascii=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated model names: " + ",".join(MODELS))
    ap.add_argument("--out", default=DATA)
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(MODELS)
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; known: {', '.join(MODELS)}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    def log(msg):
        print(msg, flush=True)

    t0 = time.time()
    for n in names:
        t = time.time()
        one(n, os.path.normpath(args.out), log)
        log(f"[{n}] done in {time.time() - t:.1f}s")
    log(f"all done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    main()
