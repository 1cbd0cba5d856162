"""Decoder-only Hugging Face directories (GPT-2, Llama 3, Mistral, Qwen2, Gemma) loaded without torch
compute what transformers computed, number for number.

Fixtures (``tests/data/hf_lm/<name>/``, ``tools/README.hf_lm.md``): tiny causal LMs of each family
trained briefly by ``tools/hf_lm_goldens.py`` on a toy language (greedy decisions by clear margins),
saved with ``save_pretrained``, with transformers' logits in float32 and float64, its greedy and
beam outputs, its tokenizer's ids, and CTranslate2's ``Generator`` outputs on its own conversion.

Checks per fixture:

- teacher-forced logits within 1e-4 of the float64 reference at the valid positions, and no worse
  than ``FACTOR`` times transformers' own float32 error there (``max |logits_f32 - logits_f64|``):
  two float32 computations of the same function, each summing in its own order, err by the same
  order of magnitude (measured: 0.7x to 1.25x of transformers' error); 2x allows another order
  of summation but not a misplaced operation (T5's query scaling in the wrong place cost 3.5x);
- greedy identical to transformers' on every row, the 16 prompts decoded together as one ragged
  batch (EOS included: any of Llama 3's three, of Qwen2's two, ends a row);
- beam search (width 4, no length penalty) identical to CTranslate2's on >= 95% of the rows
  (``llama``: to transformers', since CTranslate2 4.8.5 runs Llama 3's RoPE unscaled; the README),
  and its log-probabilities within 1e-5 of transformers' ``sequence_scores``;
- the tokenizer's ids on every test string and prompt, and their decoding, as recorded;
- text in, text out (``Pretrained.generate``) gives transformers' greedy texts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformer
from jaxformer import decoding as dec

DATA = Path(
    os.environ.get("JAXFORMER_HF_LM_FIXTURES", Path(__file__).parents[1] / "data" / "hf_lm")
)
MODELS = sorted(p.name for p in DATA.iterdir() if (p / "goldens.json").exists())
MAX_NEW = 20  # every recorded output ends with its EOS within 16 new tokens
FACTOR = 2.0  # our float32 error may be at most twice the reference framework's own (docstring)
CT2_KNOWN_WRONG = {"llama": "CTranslate2 4.8.5 drops original_max_position_embeddings: unscaled"}


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    directory = DATA / request.param
    goldens = json.loads((directory / "goldens.json").read_text())
    with np.load(directory / "arrays.npz") as arrays:  # closed (ResourceWarning is an error)
        return jaxformer.load_pretrained(directory), goldens, dict(arrays)


def _rows(pre, g, strategy):
    """Every prompt decoded in one ragged batch: ``(ids with the EOS that ended each, log-probs)``."""
    prompts = [p["ids"] for p in g["prompts"]]
    result = jaxformer.generate(
        pre.model, pre.params, prompts, end_id=pre.end_id, max_length=MAX_NEW, strategy=strategy
    )
    ids, lengths = np.asarray(result.ids)[:, 0], np.asarray(result.lengths)[:, 0]
    # After the last new token, ids[b, lengths[b]] is the EOS that ended row b (kept, as HF does).
    rows = [list(map(int, ids[b, : lengths[b] + 1])) for b in range(len(prompts))]
    assert (lengths < MAX_NEW).all(), "a row did not end: raise MAX_NEW"
    return rows, np.asarray(result.log_probs)[:, 0]


def test_every_family_has_a_fixture():
    families = {json.loads((DATA / m / "config.json").read_text())["model_type"] for m in MODELS}
    assert {"gpt2", "llama", "mistral", "qwen2", "gemma"} <= families


def test_the_checkpoint_s_special_ids(loaded):
    pre, g, _ = loaded
    ends = tuple(g["eos_ids"])
    assert pre.end_id == (ends[0] if len(ends) == 1 else ends)
    assert pre.start_id == g["bos_id"] and pre.pad_id == g["pad_id"]
    assert pre.is_language_model and pre.source_tokenizer is pre.target_tokenizer
    assert pre.decode_options().max_length == g["generation_config"]["max_new_tokens"]


def test_logits_are_within_1e4_of_float64_and_no_worse_than_transformers_float32(loaded):
    pre, g, a = loaded
    valid = a["attention_mask"].astype(bool)
    logits = jax.jit(pre.model.apply)(
        {"params": pre.params}, jnp.asarray(a["input_ids"]), jnp.asarray(valid)
    )
    ours = float(np.abs(np.asarray(logits, np.float64) - a["logits_f64"])[valid].max())
    theirs = float(np.abs(a["logits_f32"].astype(np.float64) - a["logits_f64"])[valid].max())
    print(f"{g['name']}: |jaxformer - f64| {ours:.2e}, |transformers f32 - f64| {theirs:.2e}")
    assert ours <= 1e-4, ours
    assert ours <= FACTOR * theirs, (ours, theirs)


def test_greedy_is_transformers_greedy_on_every_row(loaded):
    pre, g, _ = loaded
    ours, _ = _rows(pre, g, dec.GreedySearch())
    for row, (hyp, theirs) in enumerate(zip(ours, g["greedy"]["ids"], strict=True)):
        assert hyp == theirs, row


def test_beam_search_is_ctranslate2_s_and_scores_are_transformers(loaded):
    pre, g, _ = loaded
    ours, log_probs = _rows(pre, g, dec.BeamSearch(4, length_penalty=0.0))
    reference = g["beam_hf"] if g["name"] in CT2_KNOWN_WRONG else g["ct2"]["beam4"]
    same = sum(hyp == ref for hyp, ref in zip(ours, reference["ids"], strict=True))
    assert same >= 0.95 * len(ours), (same, len(ours))
    hf = [ids == ref for ids, ref in zip(ours, g["beam_hf"]["ids"], strict=True)]
    scores = np.asarray(g["beam_hf"]["sequence_scores"])  # the new tokens' log-probs, EOS included
    np.testing.assert_allclose(log_probs[hf], scores[hf], atol=1e-5, rtol=0)


def test_tokenizer_gives_transformers_ids_and_texts(loaded):
    pre, g, _ = loaded
    tokenizer = pre.target_tokenizer
    for case in g["tokenizer_cases"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert tokenizer.decode(case["ids"]) == case["decoded"], case["text"]
    for prompt in g["prompts"]:
        assert tokenizer.encode(prompt["text"]) == prompt["ids"], prompt["text"]


def test_generate_text_in_text_out(loaded):
    """``pre.generate(prompts)``: transformers' greedy texts (``batch_decode`` of the new tokens);
    with ``return_prompt=True``, the whole sentence of the toy language where the model
    continued it as the language does."""
    pre, g, _ = loaded
    texts = [p["text"] for p in g["prompts"]]
    outputs = pre.generate(texts)
    assert [o.texts[0] for o in outputs] == g["greedy"]["texts"]
    assert not any(o.truncated for o in outputs)
    whole = pre.generate(texts, return_prompt=True)
    for prompt, greedy, output in zip(g["prompts"], g["greedy"]["ids"], whole, strict=True):
        if greedy == prompt["expected_new_ids"]:
            assert output.texts[0] == prompt["text"] + prompt["continuation"]


def test_bfloat16_end_to_end_keeps_transformers_greedy_outputs():
    """``param_dtype="bfloat16"``: weights read as stored (gemma's are bfloat16), never widened,
    activations in bfloat16 too; the greedy outputs stay transformers' (float32) on every row."""
    directory = DATA / "gemma"
    goldens = json.loads((directory / "goldens.json").read_text())
    pre = jaxformer.load_pretrained(directory, param_dtype="bfloat16")
    assert pre.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(pre.params)} == {jnp.dtype("bfloat16")}
    rows, _ = _rows(pre, goldens, dec.GreedySearch())
    same = sum(ours == theirs for ours, theirs in zip(rows, goldens["greedy"]["ids"], strict=True))
    assert same >= len(rows) - 1, same
