"""OpenNMT-tf 2.32 checkpoints loaded without TensorFlow compute what OpenNMT-tf computed.

The fixtures (``tests/data/opennmt_tf/<model>/``) are small Transformers trained by OpenNMT-tf itself,
with OpenNMT-tf's own encoder outputs, teacher-forced logits and ``serve_function`` decodings,
recorded by ``tools/opennmt_tf_checkpoints.py`` in a throwaway venv. Nothing here imports TensorFlow.

Tolerances: encoder outputs and logits within 1e-5 of the compared values' largest magnitude
(float32 noise: jaxformer's own eager and jit runs differ by more); decoding in
``compat="opennmt-tf"`` identical ids and lengths, cumulative log-probs within 1e-5 per decoded
token (measured: at most 5.6e-5 over 9 tokens, 1.3e-6 to 5.6e-6 per token).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformer
from jaxformer import Transformer
from jaxformer import decoding as dec
from jaxformer.interop.opennmt_tf import VocabularyTokenizer
from jaxformer.interop.weights import CheckpointError

DATA = Path(__file__).parents[1] / "data" / "opennmt_tf"
MODELS = sorted(p.name for p in DATA.iterdir() if (p / "goldens.json").exists())


def _fixture(name: str):
    directory = DATA / name
    goldens = json.loads((directory / "goldens.json").read_text())
    with np.load(directory / "arrays.npz") as arrays:  # closed (ResourceWarning is an error)
        return directory, goldens, dict(arrays)


def _hints(directory: Path, goldens: dict) -> dict:
    """What an OpenNMT-tf checkpoint does not store, from the model description beside it."""
    model = goldens["model"]
    kwargs = model.get("constructor_kwargs", {})
    hints = {
        "source_vocabulary": directory / goldens["source_vocabulary"],
        "target_vocabulary": directory / goldens["target_vocabulary"],
        "positions": "sinusoidal" if model["sinusoidal_positions"] else "none",
        "activation": model.get("ffn_activation", "relu"),
    }
    if "num_heads" in kwargs:
        hints["num_heads"] = kwargs["num_heads"]
    return hints


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    directory, goldens, arrays = _fixture(request.param)
    return jaxformer.load_pretrained(directory, **_hints(directory, goldens)), goldens, arrays


def test_the_fixtures_exist():
    expected = {"article", "sinusoid_prenorm", "postnorm_shared", "relative_sinusoid", "averaged"}
    assert expected <= set(MODELS)


def _within(ours, theirs, mask, rel=1e-5):
    ours, theirs = np.asarray(ours)[mask], np.asarray(theirs)[mask]
    diff = float(np.abs(ours - theirs).max())
    assert diff <= rel * float(np.abs(theirs).max()), (diff, float(np.abs(theirs).max()))
    return diff


def test_encoder_and_logits_match_opennmt_tf(loaded):
    pre, _goldens, a = loaded
    variables = {"params": pre.params}
    src, tgt_in = jnp.asarray(a["src_ids"][: len(a["tgt_in_ids"])]), jnp.asarray(a["tgt_in_ids"])
    encoded, valid = pre.model.apply(variables, src, method=Transformer.encode)
    _within(encoded, a["encoder_output"], np.asarray(valid))
    logits = jax.jit(pre.model.apply)(variables, src, tgt_in)
    real = np.arange(tgt_in.shape[1])[None] < a["tgt_lengths"][:, None]
    _within(logits, a["logits"], real)


def _search(effective: dict):
    width = effective["beam_width"]
    if width == 1:
        return dec.GreedySearch()
    return dec.BeamSearch(
        width,
        length_penalty=float(effective["length_penalty"]),
        coverage_penalty=float(effective["coverage_penalty"]),
        num_hypotheses=width,
    )


def _decode(pre, src, effective, compat):
    return jaxformer.generate(
        pre.model,
        pre.params,
        src,
        start_id=pre.start_id,
        end_id=pre.end_id,
        max_length=effective["maximum_decoding_length"],
        min_length=effective["minimum_decoding_length"],
        strategy=_search(effective),
        compat=compat,
    )


def test_compat_decoding_is_opennmt_tf_s(loaded):
    pre, goldens, a = loaded
    src = jnp.asarray(a["src_ids"])
    for case in goldens["decoding"]:
        name = case["name"]
        result = _decode(pre, src, case["effective"], "opennmt-tf")
        theirs = a[f"{name}/ids"]
        steps = theirs.shape[2]
        ours = np.asarray(result.ids)
        np.testing.assert_array_equal(ours[:, :, :steps], theirs, err_msg=name)
        assert (ours[:, :, steps:] == pre.end_id).all(), name
        np.testing.assert_array_equal(result.lengths, a[f"{name}/lengths"], err_msg=name)
        # Cumulative log-probs: float32 noise of about 1e-6 per step adds up over the tokens
        # (the logits themselves match within 1e-5 of their magnitude): 1e-5 per decoded token.
        diff = np.abs(np.asarray(result.log_probs) - a[f"{name}/log_probs"])
        tokens = np.asarray(result.lengths) + 1  # the tokens and the EOS
        assert (diff <= 1e-5 * tokens).all(), (name, diff.max())


def _rescore(pre, src, ids, lengths):
    """Teacher-forced log-likelihood of each hypothesis up to its EOS (independent of the search)."""
    batch, width, steps = ids.shape
    flat = ids.reshape(batch * width, steps)
    tgt_in = np.concatenate([np.full((len(flat), 1), pre.start_id), flat[:, :-1]], axis=1)
    sources = np.repeat(np.asarray(src), width, axis=0)
    apply = jax.jit(pre.model.apply)
    logits = apply({"params": pre.params}, jnp.asarray(sources), jnp.asarray(tgt_in))
    log_probs = np.asarray(
        jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), flat[..., None], -1)
    )[..., 0]
    keep = np.arange(steps)[None] <= lengths.reshape(-1)[:, None]  # the tokens and the EOS
    return np.where(keep, log_probs, 0.0).sum(-1).reshape(batch, width)


def test_default_mode_differs_only_by_its_corrections():
    """Without compat, OpenNMT-tf's defects are corrected: the log-probs of the returned beams are
    their hypotheses' own (rescored by teacher forcing). (With
    ``min_length`` the search's log-probs exclude EOS from the softmax, so those cases are left out.)
    One model: the search is model-agnostic and its defects are covered by test_search_*."""
    directory, goldens, a = _fixture("article")
    pre = jaxformer.load_pretrained(directory, **_hints(directory, goldens))
    src = jnp.asarray(a["src_ids"])
    for case in goldens["decoding"]:
        effective = case["effective"]
        if effective["minimum_decoding_length"] or effective["beam_width"] == 1:
            continue  # greedy: test_compat_decoding (greedy has no defect to correct)
        result = _decode(pre, src, effective, None)
        ids, lengths = np.asarray(result.ids), np.asarray(result.lengths)
        rescored = _rescore(pre, src, ids, np.minimum(lengths, ids.shape[2] - 1))
        finished = lengths < effective["maximum_decoding_length"]
        np.testing.assert_allclose(
            np.asarray(result.log_probs)[finished],
            rescored[finished],
            atol=1e-3,
            err_msg=case["name"],
        )


def test_vocabulary_files_follow_opennmt_tf():
    directory, goldens, _a = _fixture("article")
    source = VocabularyTokenizer.load(directory / goldens["source_vocabulary"])
    assert source.unk_id == source.vocab_size - 1 == goldens["special_ids"]["<unk>_source"]
    for entry in goldens["sources"]:
        assert source.encode(entry["text"]) == entry["ids"]
    assert source.encode("never-seen") == [source.unk_id]
    assert source.unknown("a never-seen b") == ["never-seen"]


def test_missing_hints_are_named():
    directory, _goldens, _ = _fixture("sinusoid_prenorm")
    with pytest.raises(CheckpointError, match="num_heads"):
        jaxformer.load_pretrained(directory)
    with pytest.raises(CheckpointError, match="must be an int dividing"):
        jaxformer.load_pretrained(directory, num_heads=5)
    article = DATA / "article"
    with pytest.raises(CheckpointError, match="positions='none' or positions='sinusoidal'"):
        jaxformer.load_pretrained(article)
    with pytest.raises(CheckpointError, match="does not fit the relative position tables"):
        jaxformer.load_pretrained(article, num_heads=3, positions="none")
    with pytest.raises(ValueError, match="not an OpenNMT-tf catalog model"):
        jaxformer.load_pretrained(directory, model="TransformerHuge")
    with pytest.raises(TypeError, match="unknown hint"):
        jaxformer.load_pretrained(directory, num_heads=4, heads=4)


def test_a_vocabulary_of_another_size_is_refused(tmp_path):
    directory, _goldens, _ = _fixture("sinusoid_prenorm")
    wrong = tmp_path / "vocab.txt"
    wrong.write_text("<blank>\n<s>\n</s>\na\n")
    with pytest.raises(CheckpointError, match="appends; the checkpoint's embedding has"):
        jaxformer.load_pretrained(directory, num_heads=4, target_vocabulary=wrong)


def test_a_named_checkpoint_and_the_latest_are_the_same(tmp_path):
    directory, goldens, _ = _fixture("sinusoid_prenorm")
    prefix = directory / goldens["checkpoint"]
    by_dir = jaxformer.load_pretrained(directory, num_heads=4)
    by_prefix = jaxformer.load_pretrained(prefix, num_heads=4)
    by_index = jaxformer.load_pretrained(f"{prefix}.index", num_heads=4)
    for other in (by_prefix, by_index):
        leaves = jax.tree_util.tree_leaves
        for x, y in zip(leaves(by_dir.params), leaves(other.params), strict=True):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(FileNotFoundError):
        jaxformer.load_pretrained(tmp_path / "nothing-here")


def test_translate_command_reads_an_opennmt_tf_checkpoint(capsys, monkeypatch):
    """``jaxformer translate --model DIR``: tokenized text in, OpenNMT-tf's greedy tokens out."""
    import io

    from jaxformer.cli import main

    directory, goldens, a = _fixture("article")
    sources = [entry["text"] for entry in goldens["sources"][:6]]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(sources) + "\n"))
    argv = ["translate", "--model", str(directory), "--positions", "none", "--max-length", "32"]
    argv += ["--source-vocabulary", str(directory / goldens["source_vocabulary"])]
    argv += ["--target-vocabulary", str(directory / goldens["target_vocabulary"])]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    target = VocabularyTokenizer.load(directory / goldens["target_vocabulary"])
    ids, lengths = a["greedy/ids"], a["greedy/lengths"]
    expected = [target.decode(ids[b, 0, : lengths[b, 0]]) for b in range(len(sources))]
    assert lines == expected
    assert main(["translate", "--model", str(directory)]) == 2
    err = capsys.readouterr().err  # the command line's flags, not load_pretrained's parameters
    assert "pass --positions none or --positions sinusoidal" in err and "positions=" not in err


def test_the_article_preset_is_the_article_s_opennmt_tf_model():
    """``preset("article")`` is what the article's OpenNMT-tf checkpoint describes (its weights aside)."""
    directory, goldens, _ = _fixture("article")
    loaded = jaxformer.load_pretrained(directory, **_hints(directory, goldens)).config
    article = jaxformer.preset("article")
    assert loaded.absolute_positions == article.absolute_positions == "none"
    assert loaded.replace(max_len=article.max_len, positions=None) == article
