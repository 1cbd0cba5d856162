"""Generate golden outputs of OpenNMT-tf 2.32.0 ``dynamic_decode`` on toy models.

Run by hand in a throwaway venv (see tools/README.md), never by CI: it needs TensorFlow and
OpenNMT-tf. It writes ``tests/data/opennmt_tf_goldens.json``; ``--check`` regenerates everything
in memory and verifies that the stored fixture is identical.

Every case replays the shared toy model of the search tests (float32):

    logits    = logit_table[step, ids] + bonus[h % M]
    new_h     = (h * 3 + ids + 1) % M
    attention = softmax_S(att_table[step, ids]), columns j >= src_len masked to exactly 0.0
    state     = {"h": int32 [B] zeros, "src_len": int32 [B]}   (tiled to B*W rows for beam search)

plus OpenNMT-tf's own greedy tests (one-hot logits per step, replayed from ``step_logits``).

Besides OpenNMT-tf's outputs, each case stores ``rescored_log_probs``: the teacher-forced log
likelihood of each returned hypothesis under the same model and the same logits processing as
the search (EOS logit + -1e7 while step < min_length), summed up to and including the first EOS
(all T tokens when there is none). ``diagnostics`` records where OpenNMT-tf's three known defects
were triggered (they are computed from a step trace of a second, instrumented eager run whose
outputs are asserted identical to the plain run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import numpy as np
import opennmt
import tensorflow as tf
import tensorflow_addons as tfa
from opennmt.utils import decoding

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "opennmt_tf_goldens.json"
MASTER_SEED = 20251121
ATT_TOL = 1e-6  # attention mismatch threshold (same TF ops, so real mismatches are large)
LP_TOL = 1e-3
N_MIXED = 10
N_RANDOM_BEAM = 24
N_TARGETED = 6
N_DEFECT3 = 3
N_DEFECT3_TRIES = 400  # log-prob mismatch threshold (float32 search vs float64 rescoring)

TOY_MODEL = (
    "float32 toy model: logits = logit_table[step, ids] + bonus[h % M]; "
    "new_h = (h * 3 + ids + 1) % M; attention = softmax over S of att_table[step, ids] with "
    "columns j >= src_len[row] masked out (exactly 0.0); initial state {h: int32 zeros [B], "
    "src_len: int32 [B]}, tiled with tfa.seq2seq.tile_batch to B*W rows for beam search. "
    "Tables drawn from np.random.default_rng(seed).standard_normal (float32) in the order "
    "logit_table [T_max, V, V], bonus [M, V], att_table [T_max, V, S]; tie_round: x = "
    "round(2x)/2; then eos_bias added to logit_table[..., end_id]. T_max = max_length. "
    "Cases with model 'step_logits' (OpenNMT-tf's own greedy tests) use logits = "
    "step_logits[step] (one row per batch entry), no state, no attention. "
    "rescored_log_probs: teacher-forced sum of log_softmax(logits) of the returned ids up to "
    "and including the first EOS, with the search's min_length EOS penalty (+-1e7)."
)


# --------------------------------------------------------------------------- models


def make_tables(seed, t_max, v, s, m, tie_round, eos_bias, end_id):
    rng = np.random.default_rng(seed)
    logit_table = rng.standard_normal((t_max, v, v)).astype(np.float32)
    bonus = rng.standard_normal((m, v)).astype(np.float32)
    att_table = rng.standard_normal((t_max, v, s)).astype(np.float32)
    if tie_round:
        logit_table, bonus, att_table = (
            (np.round(x * 2) / 2).astype(np.float32) for x in (logit_table, bonus, att_table)
        )
    logit_table[..., end_id] += np.float32(eos_bias)
    return logit_table, bonus, att_table


def tf_toy_step_fn(logit_table, bonus, att_table):
    lt = tf.constant(logit_table, dtype=tf.float32)
    bn = tf.constant(bonus, dtype=tf.float32)
    at = tf.constant(att_table, dtype=tf.float32)
    m = bonus.shape[0]
    s = att_table.shape[-1]

    def step_fn(ids, step, state):
        h = state["h"]
        src_len = state["src_len"]
        logits = tf.gather(tf.gather(lt, step), ids) + tf.gather(bn, h % m)
        new_h = (h * 3 + ids + 1) % m
        scores = tf.gather(tf.gather(at, step), ids)
        mask = tf.range(s)[tf.newaxis, :] < src_len[:, tf.newaxis]
        masked = tf.where(mask, scores, tf.fill(tf.shape(scores), tf.constant(-np.inf)))
        attention = tf.where(mask, tf.nn.softmax(masked, axis=-1), tf.zeros_like(scores))
        return logits, {"h": new_h, "src_len": src_len}, attention

    return step_fn


def tf_step_logits_fn(step_logits):
    table = tf.constant(step_logits, dtype=tf.float32)  # [T, B, V]

    def step_fn(ids, step, state):
        return tf.gather(table, step), state

    return step_fn


def np_log_softmax(x):
    x = x.astype(np.float64)
    mx = np.max(x)
    return x - mx - np.log(np.sum(np.exp(x - mx)))


def rescore(inp, ids):
    """Teacher-forced log likelihood of returned ids [B, W, T] (float64 sums)."""
    end_id, min_length = inp["end_id"], inp["min_length"]
    bsz, width, t_len = ids.shape
    out = np.zeros((bsz, width), dtype=np.float64)
    for b in range(bsz):
        for w in range(width):
            prev, h, total = inp["start_ids"][b], 0, 0.0
            for t in range(t_len):
                if inp["model"] == "toy":
                    lt = np.asarray(inp["logit_table"], np.float32)
                    bn = np.asarray(inp["bonus"], np.float32)
                    logits = lt[t, prev] + bn[h % bn.shape[0]]
                    h = (h * 3 + prev + 1) % bn.shape[0]
                else:
                    logits = np.asarray(inp["step_logits"], np.float32)[t, b].copy()
                if t < min_length:
                    logits[end_id] += np.float32(-1e7)
                tok = int(ids[b, w, t])
                total += np_log_softmax(logits)[tok]
                prev = tok
                if tok == end_id:
                    break
            out[b, w] = total
    return out


def np_attention(inp, t, prev, src_len):
    """The attention the toy model gives at step t after token prev (computed with TF ops)."""
    step_fn = tf_toy_step_fn(
        np.asarray(inp["logit_table"], np.float32),
        np.asarray(inp["bonus"], np.float32),
        np.asarray(inp["att_table"], np.float32),
    )
    _, _, att = step_fn(
        tf.constant(prev, tf.int32),
        tf.constant(t, tf.int32),
        {"h": tf.zeros([len(prev)], tf.int32), "src_len": tf.constant(src_len, tf.int32)},
    )
    return att.numpy()


# --------------------------------------------------------------------------- decoding


class TracingBeamSearch(decoding.BeamSearch):
    """BeamSearch that records per-step tensors (eager execution only). Outputs unchanged."""

    def __init__(self, *args, trace, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace = trace

    def step(self, step, sampler, log_probs, cum_log_probs, finished, state=None, **kwargs):
        picked = []

        def recording_sampler(scores, num_samples=1):
            sample_ids, sample_scores = sampler(scores, num_samples=num_samples)
            picked.append(sample_ids)
            return sample_ids, sample_scores

        out = super().step(
            step, recording_sampler, log_probs, cum_log_probs, finished, state=state, **kwargs
        )
        word_ids, next_cum, new_finished, _, extra = out
        # Beam ids come from the sampler's picks: reading extra["parent_ids"] (an eager
        # TensorArray) here was seen to change the decoded ids of the run.
        beam_ids = tf.reshape(picked[0], [-1]).numpy() // log_probs.shape[-1]
        rows = np.arange(beam_ids.shape[0])
        self.trace.append(
            {
                "beam_indices": (rows // self.beam_size) * self.beam_size + beam_ids,
                "cum_before": cum_log_probs.numpy(),
                "next_cum": next_cum.numpy(),
                "finished_gathered": new_finished.numpy(),
                "word_ids": word_ids.numpy(),
                "sequence_lengths": extra["sequence_lengths"].numpy(),
            }
        )
        return out


def has_tie(scores, k):
    """Exact tie among the finite top k+1 scores of some row (ties decide the top-k order)."""
    top = -np.sort(-scores, axis=-1)[:, : k + 1]
    finite = top > -1e6
    return bool(np.any((top[:, 1:] == top[:, :-1]) & finite[:, 1:]))


class TieRecordingSampler(decoding.BestSampler):
    def __init__(self, ties):
        self.ties = ties

    def __call__(self, scores, num_samples=1):
        self.ties.append(has_tie(scores.numpy(), num_samples))
        return super().__call__(scores, num_samples=num_samples)


def build_call(inp, trace=None):
    bsz = len(inp["start_ids"])
    if inp["model"] == "toy":
        step_fn = tf_toy_step_fn(
            np.asarray(inp["logit_table"], np.float32),
            np.asarray(inp["bonus"], np.float32),
            np.asarray(inp["att_table"], np.float32),
        )
        state = {
            "h": tf.zeros([bsz], tf.int32),
            "src_len": tf.constant(inp["src_len"], tf.int32),
        }
    else:
        step_fn = tf_step_logits_fn(np.asarray(inp["step_logits"], np.float32))
        state = None
    if inp["strategy"] == "greedy":
        strategy = decoding.GreedySearch()
    else:
        cls = decoding.BeamSearch if trace is None else TracingBeamSearch
        kw = {} if trace is None else {"trace": trace}
        strategy = cls(
            inp["beam_size"],
            length_penalty=inp["length_penalty"],
            coverage_penalty=inp["coverage_penalty"],
            **kw,
        )
        if state is not None:
            state = tfa.seq2seq.tile_batch(state, inp["beam_size"])
    ties = []
    if trace is not None:
        trace.append({"ties": ties})

    def call():
        return decoding.dynamic_decode(
            step_fn,
            tf.constant(inp["start_ids"], tf.int32),
            end_id=inp["end_id"],
            initial_state=state,
            decoding_strategy=strategy,
            sampler=decoding.BestSampler() if trace is None else TieRecordingSampler(ties),
            maximum_iterations=inp["max_length"],
            minimum_iterations=inp["min_length"],
            attention_history=inp["attention_history"],
            attention_size=inp["attention_size"],
        )

    return call


def result_to_lists(res):
    return {
        "ids": res.ids.numpy().tolist(),
        "lengths": res.lengths.numpy().tolist(),
        "log_probs": res.log_probs.numpy().tolist(),
        "attention": None if res.attention is None else res.attention.numpy().tolist(),
    }


def run_case(inp, graph_check):
    plain = result_to_lists(build_call(inp)())
    trace = []
    traced = result_to_lists(build_call(inp, trace=trace)())
    if traced != plain:
        raise AssertionError("instrumented run differs from plain run")
    if graph_check:
        graph = result_to_lists(tf.function(build_call(inp))())
        if graph != plain:
            raise AssertionError("tf.function run differs from eager run")
    plain["steps_run"] = int(np.asarray(plain["ids"]).shape[-1])
    return plain, trace


# --------------------------------------------------------------------------- diagnostics


def diagnose(inp, out, trace):
    ids = np.asarray(out["ids"])
    bsz, width, t_len = ids.shape
    lengths = np.asarray(out["lengths"])
    log_probs = np.asarray(out["log_probs"], np.float64)
    rescored = rescore(inp, ids)
    diff = np.abs(log_probs - rescored)
    ties = trace.pop(0)["ties"]
    diag = {
        "exact_tie_at_selection": any(ties),
        "early_finish": False,
        "never_finished": not bool(np.any(ids == inp["end_id"])),
        "log_probs_mismatch": int(np.sum(diff > LP_TOL)),
        "max_abs_log_prob_diff": float(np.max(diff)),
        # defect 1: a finished hypothesis moved to a row whose old cum differs, and OpenNMT-tf
        # kept the old row's cum (cum = where(finished, cum_old_row, new)).
        "finished_cum_kept_events": 0,
        # defect 3: rows of a batch entry permuted after that entry's own last step
        # (ids follow the rows at that step, log_probs the rows after the last step run).
        "rows_permuted_after_own_last_step": 0,
        "rows_permuted_distinct_hyps": 0,
        # defect 2: returned attention differs from the attention of the row that generated
        # the token (positions of real tokens, EOS included, within the returned T-1 steps).
        "attention_mismatch_positions": None,
        "attention_mismatch_positions_non_eos": None,
        "travel_cum_at_own_last_mismatch": None,
        "defect3_visible_if_cum_travelled": None,
    }
    # Steps each batch entry ran until all its returned hypotheses had ended (T if one never did).
    has_eos = np.any(ids == inp["end_id"], axis=-1)
    entry_end = np.where(has_eos, lengths + 1, t_len).max(axis=-1)
    diag["entries_finish_at_different_steps"] = bool(len(set(entry_end.tolist())) > 1)
    # Early finish: some returned hypothesis ends (EOS) before the last step run.
    diag["early_finish"] = bool(
        np.any((lengths < t_len - 1) & np.any(ids == inp["end_id"], axis=-1))
    )
    if trace:
        for rec in trace:
            fin = rec["finished_gathered"]
            moved = fin & (rec["next_cum"] != rec["cum_before"])
            diag["finished_cum_kept_events"] += int(np.sum(moved))
        # Counterfactual bookkeeping on the same run: the cum that travels with its
        # hypothesis (sum of the picked per-step log-probs along the rows' lineage).
        travel = np.tile(np.asarray([0.0] + [-np.inf] * (width - 1)), bsz)
        travel_hist = []
        for rec in trace:
            bi = rec["beam_indices"]
            picked = rec["next_cum"].astype(np.float64) - rec["cum_before"][bi]
            travel = travel[bi] + picked
            travel_hist.append(travel)
        seq_len = trace[-1]["sequence_lengths"].reshape(bsz, width)
        at_own_last = np.zeros((bsz, width))
        for b in range(bsz):
            own_last = min(int(seq_len[b].max()), t_len)
            at_own_last[b] = travel_hist[own_last - 1][b * width : (b + 1) * width]
        final = travel_hist[-1].reshape(bsz, width)
        # Travelling cum read at each entry's own last step describes the returned ids: it must
        # equal the rescoring (so every mismatch of OpenNMT-tf's log_probs is defect 1).
        diag["travel_cum_at_own_last_mismatch"] = int(
            np.sum(np.abs(at_own_last - rescored) > LP_TOL)
        )
        # Travelling cum read after the last step run (defect 1 fixed, defect 3 kept).
        diag["defect3_visible_if_cum_travelled"] = int(np.sum(np.abs(final - rescored) > LP_TOL))
        for b in range(bsz):
            own_last = min(int(seq_len[b].max()), t_len)
            if own_last >= t_len:
                continue
            p = np.arange(bsz * width)
            for s in range(t_len - 1, own_last - 1, -1):
                p = trace[s]["beam_indices"][p]
            p = p[b * width : (b + 1) * width] - b * width
            if np.any(p != np.arange(width)):
                diag["rows_permuted_after_own_last_step"] += 1
                if any(not np.array_equal(ids[b, w], ids[b, p[w]]) for w in range(width)):
                    diag["rows_permuted_distinct_hyps"] += 1
    if out["attention"] is not None and inp["model"] == "toy":
        att = np.asarray(out["attention"], np.float32)  # [B, W, T-1, S]
        bad = bad_non_eos = 0
        for t in range(t_len - 1):
            if t == 0:
                prev = np.repeat(np.asarray(inp["start_ids"]), width)
            else:
                prev = ids[:, :, t - 1].reshape(-1)
            src = np.repeat(np.asarray(inp["src_len"]), width)
            expect = np_attention(inp, t, prev, src).reshape(bsz, width, -1)
            for b in range(bsz):
                for w in range(width):
                    if t > lengths[b, w]:
                        continue  # after the EOS token
                    if np.max(np.abs(att[b, w, t] - expect[b, w])) > ATT_TOL:
                        bad += 1
                        if t < lengths[b, w]:
                            bad_non_eos += 1
        diag["attention_mismatch_positions"] = bad
        diag["attention_mismatch_positions_non_eos"] = bad_non_eos
    return rescored.tolist(), diag


# --------------------------------------------------------------------------- cases


def onehot_cases():
    specs = [
        ("opennmt_greedy", [[4, 5, 6, 2], [3, 8, 2, 8]], None, 0),
        ("opennmt_greedy_max2", [[4, 5, 6, 2], [3, 8, 2, 8]], 2, 0),
        ("opennmt_greedy_min2", [[4, 2, 2, 2], [3, 8, 7, 2]], None, 2),
    ]
    cases = []
    for name, targets, max_len, min_len in specs:
        step_logits = np.transpose(np.eye(10, dtype=np.float32)[np.asarray(targets)], (1, 0, 2))
        cases.append(
            {
                "name": name,
                "model": "step_logits",
                "targets": targets,
                "step_logits": step_logits.tolist(),
                "V": 10,
                "start_ids": [1, 1],
                "end_id": 2,
                "strategy": "greedy",
                "sampler": "best",
                "beam_size": 1,
                "length_penalty": 0.0,
                "coverage_penalty": 0.0,
                "max_length": max_len,
                "min_length": min_len,
                "attention_history": False,
                "attention_size": None,
            }
        )
    return cases


def toy_case(name, seed, b, v, s, m, max_len, min_len, strategy, beam, lp, cp, att, tie, bias, end):
    logit_table, bonus, att_table = make_tables(seed, max_len, v, s, m, tie, bias, end)
    rng = np.random.default_rng(seed + 1)
    src_len = rng.integers(1, s + 1, size=b).tolist()
    att = att or cp != 0
    return {
        "name": name,
        "model": "toy",
        "seed": seed,
        "B": b,
        "V": v,
        "S": s,
        "M": m,
        "T_max": max_len,
        "tie_round": tie,
        "eos_bias": bias,
        "logit_table": logit_table.tolist(),
        "bonus": bonus.tolist(),
        "att_table": att_table.tolist(),
        "src_len": src_len,
        "start_ids": [1] * b,
        "end_id": end,
        "strategy": strategy,
        "sampler": "best",
        "beam_size": 1 if strategy == "greedy" else beam,
        "length_penalty": lp,
        "coverage_penalty": cp,
        "max_length": max_len,
        "min_length": min_len,
        "attention_history": bool(att),
        "attention_size": s if att else None,
    }


def toy_cases():
    rng = np.random.default_rng(MASTER_SEED)
    cases = []

    def add(kind, **kw):
        seed = int(rng.integers(0, 2**31 - 1))
        b = kw.pop("b", int(rng.integers(1, 4)))
        v = kw.pop("v", int(rng.integers(5, 10)))
        s = kw.pop("s", int(rng.integers(3, 6)))
        m = kw.pop("m", int(rng.choice([3, 5])))
        max_len = kw.pop("max_len", int(rng.integers(1, 9)))
        min_len = kw.pop("min_len", int(rng.integers(0, min(3, max_len) + 1)))
        strategy = kw.pop("strategy", "beam")
        beam = kw.pop("beam", int(rng.integers(1, 5)))
        lp = kw.pop("lp", float(rng.choice([0.0, 0.2, 0.6, 1.0])))
        cp = kw.pop("cp", float(rng.choice([0.0, 0.2, 0.4])))
        att = kw.pop("att", bool(rng.integers(0, 2)))
        tie = kw.pop("tie", bool(rng.random() < 0.3))
        end = kw.pop("end", 2)
        start = kw.pop("start", None)
        if kind == "bias":
            bias = float(rng.choice([1.5, 2.0, 2.5, 3.0]))
            if not tie:
                bias = float(np.float32(rng.uniform(1.5, 3.0)))
        elif kind == "never":
            bias = -30.0
        else:
            bias = 0.0
        bias = kw.pop("bias", bias)
        assert not kw, kw
        if strategy == "greedy":
            beam, lp, cp = 1, 0.0, 0.0
        name = f"toy{len(cases):02d}_{strategy}_{kind}"
        case = toy_case(
            name, seed, b, v, s, m, max_len, min_len, strategy, beam, lp, cp, att, tie, bias, end
        )
        if start == "mixed":
            # Per-entry start ids (not EOS) so that batch entries diverge and finish at
            # different steps: with equal start ids only src_len (via coverage) tells them apart.
            choices = [x for x in range(v) if x != end]
            case["start_ids"] = [int(x) for x in rng.choice(choices, size=b, replace=False)]
            case["name"] = name + "_mixedstart"
        cases.append(case)

    # Greedy.
    for kind in ["plain", "bias", "bias", "never", "bias", "plain"]:
        add(kind, strategy="greedy")
    add("bias", strategy="greedy", end=0, tie=True)
    # Beam search, random mixes.
    kinds = ["bias", "plain", "bias", "never", "bias", "bias", "plain", "bias"]
    for i in range(N_RANDOM_BEAM):
        add(kinds[i % len(kinds)])
    # Beam search aimed at batch entries finishing at different steps (defects 1-3).
    for _ in range(N_TARGETED):
        add("bias", b=3, beam=int(rng.integers(2, 5)), max_len=int(rng.integers(6, 9)), att=True)
    # Explicit ties, other end ids, coverage.
    add("bias", b=2, beam=3, max_len=6, tie=True, lp=0.0, cp=0.0, att=True)
    add("bias", b=2, beam=4, max_len=7, tie=True, lp=0.6, cp=0.2)
    add("bias", b=3, beam=2, max_len=8, end=0, lp=1.0, cp=0.4)
    add("bias", b=2, beam=3, max_len=5, end=4, min_len=3, lp=0.2, cp=0.0, att=True)
    add("never", b=2, beam=3, max_len=5, cp=0.4)
    # Per-entry start ids: batch entries finish at different steps.
    for _ in range(3):
        add("bias", strategy="greedy", b=int(rng.integers(2, 4)), start="mixed", att=True)
    for _ in range(N_MIXED):
        add(
            "bias",
            b=int(rng.integers(2, 4)),
            beam=int(rng.integers(2, 5)),
            max_len=int(rng.integers(5, 9)),
            lp=float(rng.choice([0.2, 0.6, 1.0])),
            start="mixed",
        )
    return cases


def defect3_candidates():
    """Candidates for a batch entry finishing early and its rows permuting afterwards."""
    rng = np.random.default_rng(MASTER_SEED + 3)
    for i in range(N_DEFECT3_TRIES):
        seed = int(rng.integers(0, 2**31 - 1))
        b = int(rng.integers(2, 4))
        v = int(rng.integers(5, 10))
        s = int(rng.integers(3, 6))
        m = int(rng.choice([3, 5]))
        beam = int(rng.integers(2, 5))
        lp = float(rng.choice([0.6, 1.0]))
        cp = float(rng.choice([0.0, 0.2, 0.4]))
        min_len = int(rng.integers(0, 3))
        bias = float(np.float32(rng.uniform(1.5, 3.0)))
        case = toy_case(
            f"defect3_{i:03d}_beam_bias_mixedstart",
            seed,
            b,
            v,
            s,
            m,
            8,
            min_len,
            "beam",
            beam,
            lp,
            cp,
            True,
            False,
            bias,
            2,
        )
        choices = [x for x in range(v) if x != 2]
        case["start_ids"] = [int(x) for x in rng.choice(choices, size=b, replace=False)]
        yield case


def make_case(inp, graph_check):
    out, trace = run_case(inp, graph_check)
    rescored, diag = diagnose(inp, out, trace)
    name = inp.pop("name")
    return {
        "name": name,
        "inputs": inp,
        "outputs": out,
        "rescored_log_probs": rescored,
        "diagnostics": diag,
    }


def generate(graph_check):
    cases = [make_case(inp, graph_check) for inp in onehot_cases() + toy_cases()]
    # Deterministic search: keep the first few candidates that trigger defect 3.
    found = 0
    for inp in defect3_candidates():
        case = make_case(inp, graph_check=False)
        if case["diagnostics"]["rows_permuted_distinct_hyps"] > 0:
            inp["name"] = case["name"]
            cases.append(make_case(inp, graph_check))
            found += 1
            if found == N_DEFECT3:
                break
    return {
        "opennmt_tf_version": opennmt.__version__,
        "tensorflow_version": tf.__version__,
        "tensorflow_addons_version": tfa.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "toy_model": TOY_MODEL,
        "cases": cases,
    }


def dumps(data):
    head = {k: v for k, v in data.items() if k != "cases"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)},")
    lines.append('  "cases": [')
    body = ["    " + json.dumps(c, separators=(",", ":"), allow_nan=False) for c in data["cases"]]
    lines.append(",\n".join(body))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def summary(data):
    cases = data["cases"]
    d = [c["diagnostics"] for c in cases]
    inps = [c["inputs"] for c in cases]
    rows = {
        "cases": len(cases),
        "greedy": sum(i["strategy"] == "greedy" for i in inps),
        "beam": sum(i["strategy"] == "beam" for i in inps),
        "early_finish (a hypothesis ends before the last step)": sum(x["early_finish"] for x in d),
        "batch entries finish at different steps": sum(
            x["entries_finish_at_different_steps"] for x in d
        ),
        "never_finished": sum(x["never_finished"] for x in d),
        "exact tie decided by top_k order": sum(x["exact_tie_at_selection"] for x in d),
        "tie_round": sum(bool(i.get("tie_round")) for i in inps),
        "coverage": sum(i["coverage_penalty"] != 0 for i in inps),
        "length_penalty": sum(i["length_penalty"] != 0 for i in inps),
        "min_length>0": sum(i["min_length"] > 0 for i in inps),
        "attention_history": sum(i["attention_history"] for i in inps),
        "end_id!=2": sum(i["end_id"] != 2 for i in inps),
        "defect1 finished_cum_kept (cases)": sum(x["finished_cum_kept_events"] > 0 for x in d),
        "defect1 -> returned log_probs != rescored (cases)": sum(
            x["log_probs_mismatch"] > 0 for x in d
        ),
        "defect2 attention mismatch (cases)": sum(
            bool(x["attention_mismatch_positions"]) for x in d
        ),
        "defect2 attention mismatch non-EOS (cases)": sum(
            bool(x["attention_mismatch_positions_non_eos"]) for x in d
        ),
        "defect2 last step dropped, hyp without EOS (cases)": sum(
            i["attention_history"]
            and any(len(h) and h[-1] != i["end_id"] for hs in c["outputs"]["ids"] for h in hs)
            for i, c in zip(inps, cases, strict=True)
        ),
        "defect3 rows permuted after own last step (cases)": sum(
            x["rows_permuted_after_own_last_step"] > 0 for x in d
        ),
        "defect3 ... with distinct hypotheses (cases)": sum(
            x["rows_permuted_distinct_hyps"] > 0 for x in d
        ),
        "defect3 visible if cum travelled (cases)": sum(
            bool(x["defect3_visible_if_cum_travelled"]) for x in d
        ),
        "CHECK travel cum at own last step != rescored (cases)": sum(
            bool(x["travel_cum_at_own_last_mismatch"]) for x in d
        ),
    }
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="verify the fixture regenerates")
    parser.add_argument(
        "--no-graph-check", action="store_true", help="skip the tf.function cross-check"
    )
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    data = generate(graph_check=not args.no_graph_check)
    text = dumps(data)
    for k, v in summary(data).items():
        print(f"{k:55s} {v}")
    if args.check:
        stored = args.out.read_text()
        if stored == text:
            print(f"OK: {args.out} regenerates identically ({len(text)} bytes)")
            return 0
        old, new = json.loads(stored), json.loads(text)
        for i, (a, b) in enumerate(zip(old.get("cases", []), new["cases"], strict=False)):
            if a != b:
                print(f"case {i} ({b['name']}) differs")
        print(f"MISMATCH: {args.out} does not regenerate identically")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text)} bytes, {len(data['cases'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
