"""The vectorized search against the independent loop-based NumPy reference, both modes.

The reference (tests/reference_search.py) was written apart from jaxformer.decoding and was itself
checked against real OpenNMT-tf 2.32 (tensorflow-cpu 2.13.1) on 2,960 random configurations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer import decoding as dec

from reference_search import reference_decode, toy_model
from toy import initial_state, jax_toy_step_fn


def random_case(seed):
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 4))
    vocab = int(rng.integers(4, 10))
    beam = int(rng.integers(1, min(vocab, 5) + 1))
    max_length = int(rng.integers(1, 9))
    case = dict(
        seed=seed,
        batch=batch,
        vocab=vocab,
        source=int(rng.integers(2, 6)),
        beam=beam,
        max_length=max_length,
        min_length=int(rng.integers(0, min(max_length, 3) + 1)),
        length_penalty=float(rng.choice([0.0, 0.2, 0.6, 1.0])),
        coverage_penalty=float(rng.choice([0.0, 0.0, 0.2, 0.4])),
        tie_round=bool(rng.random() < 0.3),
        end_id=int(rng.integers(0, vocab)),
        eos_bias=float(rng.choice([0.0, 1.5, 3.0])),
        force_beam=bool(beam == 1 and rng.random() < 0.5),
        # Different start ids make batch entries diverge and finish at different steps.
        start_ids=rng.integers(0, vocab, batch).astype(np.int32),
    )
    return case


CASES = [random_case(seed) for seed in range(48)]


def two_end_ids(seed):
    """A case whose hypotheses end on either of two ids (Llama 3 has three)."""
    case = random_case(seed)
    rng = np.random.default_rng(1000 + seed)
    other = int(rng.choice([i for i in range(case["vocab"]) if i != case["end_id"]]))
    return case | dict(end_ids=(case["end_id"], other))


MULTI_EOS_CASES = [two_end_ids(seed) for seed in range(100, 112)]


def run_reference_only(case, compat=None):
    step_np, state_np, params = toy_model(
        case["seed"],
        V=case["vocab"],
        S=case["source"],
        M=5,
        T_max=case["max_length"],
        B=case["batch"],
        tie_round=case["tie_round"],
        eos_id=case["end_id"],
        eos_bias=case["eos_bias"],
    )
    start = case["start_ids"]
    beam = case["beam"] > 1 or case["force_beam"]
    expected = reference_decode(
        step_np,
        start,
        case.get("end_ids", case["end_id"]),
        state_np,
        beam_size=case["beam"],
        length_penalty=case["length_penalty"] if beam else 0.0,
        coverage_penalty=case["coverage_penalty"] if beam else 0.0,
        max_length=case["max_length"],
        min_length=case["min_length"],
        attention_size=case["source"],
        return_attention=True,
        compat=compat,
        strategy="beam" if beam else "greedy",
    )
    return expected, params


def run_both(case, compat):
    expected, params = run_reference_only(case, compat)
    beam = case["beam"] > 1 or case["force_beam"]
    strategy = (
        dec.BeamSearch(case["beam"], case["length_penalty"], case["coverage_penalty"])
        if beam
        else dec.GreedySearch()
    )

    def decode(
        params, start_ids
    ):  # one program (eager, the loop's set-up ran op by op: 2.4x slower)
        return dec.dynamic_decode(
            jax_toy_step_fn(params),
            start_ids,
            case.get("end_ids", case["end_id"]),
            initial_state(params, case["batch"]),
            strategy=strategy,
            max_length=case["max_length"],
            min_length=case["min_length"],
            attention_size=case["source"],
            return_attention=True,
            compat=compat,
        )

    return expected, jax.jit(decode)(params, case["start_ids"])


@pytest.mark.parametrize("compat", [None, "opennmt-tf"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c['seed']}")
def test_matches_the_numpy_reference(case, compat):
    expected, got = run_both(case, compat)
    assert int(got.steps) == expected["steps_run"]
    np.testing.assert_array_equal(got.ids, expected["ids"])
    np.testing.assert_array_equal(got.lengths, expected["lengths"])
    np.testing.assert_allclose(got.log_probs, expected["log_probs"], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(got.scores, expected["scores"], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(got.attention, expected["attention"], atol=1e-6)


@pytest.mark.parametrize("case", MULTI_EOS_CASES, ids=lambda c: f"seed{c['seed']}")
def test_several_end_ids_match_the_numpy_reference(case):
    expected, got = run_both(case, None)
    assert int(got.steps) == expected["steps_run"]
    np.testing.assert_array_equal(got.ids, expected["ids"])
    np.testing.assert_array_equal(got.lengths, expected["lengths"])
    np.testing.assert_allclose(got.log_probs, expected["log_probs"], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(got.scores, expected["scores"], atol=1e-5, rtol=1e-6)


def test_the_multi_eos_cases_end_on_the_second_id_too():
    ended_on = {0: 0, 1: 0}
    for case in MULTI_EOS_CASES:
        expected, _ = run_reference_only(case)
        ids, lengths = expected["ids"], expected["lengths"]
        for b, w in np.ndindex(lengths.shape):
            if lengths[b, w] < ids.shape[-1]:
                ended_on[case["end_ids"].index(int(ids[b, w, lengths[b, w]]))] += 1
    assert ended_on[0] >= 5 and ended_on[1] >= 5, ended_on


def test_the_cases_exercise_what_matters():
    """Guard against a case generator that silently stops covering the hard paths."""
    n = len(CASES)
    # Batch entries that end at different steps (their longest hypotheses differ in length).
    uneven = 0
    for case in CASES:
        expected, _ = run_reference_only(case)
        ends = (expected["ids"] == case["end_id"]).any(-1).all(-1)  # [B] every hypothesis ended
        longest = expected["lengths"].max(-1)
        uneven += bool(ends.any() and len(set(longest[ends].tolist())) > 1)
    assert uneven >= 5
    assert sum(c["beam"] > 1 for c in CASES) > n // 2
    assert sum(c["coverage_penalty"] > 0 and c["beam"] > 1 for c in CASES) >= 5
    assert sum(c["tie_round"] for c in CASES) >= 5
    assert sum(c["min_length"] > 0 for c in CASES) >= 10
    assert sum(c["force_beam"] for c in CASES) >= 1


def test_sampling_ends_on_any_end_id():
    """Sampled hypotheses end on either id; the id they ended on is kept, the first follows."""
    case = MULTI_EOS_CASES[0] | dict(batch=3, max_length=8)
    _, params = run_reference_only(case)
    first, second = case["end_ids"]
    result = jax.jit(
        lambda params, key: dec.dynamic_decode(
            jax_toy_step_fn(params), jnp.zeros([3], jnp.int32), case["end_ids"],
            initial_state(params, 3), strategy=dec.BeamSearch(2),
            sampler=dec.RandomSampler(topk=0), max_length=8, rng=key,
        )
    )  # fmt: skip
    ended = set()
    for seed in range(6):
        out = result(params, jax.random.key(seed))
        ids, lengths = np.asarray(out.ids), np.asarray(out.lengths)
        for b, w in np.ndindex(lengths.shape):
            n = lengths[b, w]
            assert not np.isin(ids[b, w, :n], case["end_ids"]).any()  # no end before its end
            if n < ids.shape[-1]:
                ended.add(int(ids[b, w, n]))
                assert (ids[b, w, n + 1 :] == first).all()
    assert ended == {first, second}
