"""The options LM users expect, against transformers' own outputs on the tiny trained fixtures.

``tests/data/hf_lm/<name>/options.json`` (``tools/hf_lm_options_goldens.py``,
``tools/README.hf_lm.md``) holds transformers' ``generate`` outputs of the 16 stored prompts under
``repetition_penalty`` and ``no_repeat_ngram_size``, each prompt alone (``single``). jaxformer's
history is transformers' (the prompt, its BOS included, then what was generated) and its options act
on the logits (``decoding/repetition.py``), so:

- greedy search gives transformers' ids on every row of every setting, including the strong ones
  that change most rows (a reward of 0.2, a penalty of 10, n-gram sizes 1 and 2);
- beam search with an n-gram ban gives transformers' ids too (-inf on a logit or a log-prob is the
  same ban); transformers' beam search applies a repetition penalty to log-probs, which jaxformer
  does not reproduce (it is not checked here);
- and the command line's ``generate --model`` continues as transformers does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

import jaxformer
from jaxformer import decoding as dec

DATA = Path(__file__).parents[1] / "data" / "hf_lm"
MODELS = sorted(p.name for p in DATA.iterdir() if (p / "options.json").exists())
GREEDY = [
    "greedy_rp1.3", "greedy_rp10.0", "greedy_ngram1", "greedy_ngram2", "greedy_rp0.2",
    "greedy_rp0.2_ngram2",
]  # fmt: skip
BEAM = ["beam4_ngram2"]
CHECKED = GREEDY + BEAM
MARGIN = 1e-3  # rows whose greedy decision is closer than this are a coin toss in float32


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    directory = DATA / request.param
    return jaxformer.load_pretrained(directory), json.loads(
        (directory / "options.json").read_text()
    )


def _single(record: dict) -> list[list[int]]:
    """transformers' ids of each prompt generated alone (its batched rows, corrected)."""
    ids = [list(row) for row in record["ids"]]
    for row, alone in (record.get("single_differ") or {}).items():
        ids[int(row)] = list(alone)
    return ids


def _ours(pre, options: dict, setting: dict) -> list[list[int]]:
    width = setting["beam"]
    result = jaxformer.generate(
        pre.model, pre.params, options["prompt_ids"], end_id=pre.end_id,
        max_length=options["max_new_tokens"],
        strategy=dec.BeamSearch(width, length_penalty=0.0) if width > 1 else dec.GreedySearch(),
        repetition_penalty=setting.get("repetition_penalty", 1.0),
        no_repeat_ngram_size=setting.get("no_repeat_ngram_size", 0),
    )  # fmt: skip
    ids, lengths = np.asarray(result.ids)[:, 0], np.asarray(result.lengths)[:, 0]
    ends = options["eos_ids"]
    return [  # with the EOS that ended the row, as transformers' rows have it
        list(
            map(
                int,
                ids[b, : lengths[b] + (lengths[b] < ids.shape[1] and ids[b, lengths[b]] in ends)],
            )
        )
        for b in range(len(ids))
    ]


def test_the_checked_settings_change_outputs():
    """A setting that changes nothing could not fail a test: the checked ones change many rows."""
    changed = 0
    for name in MODELS:
        report = json.loads((DATA / name / "options.json").read_text())["report"]
        changed += sum(report[s]["hf_single_changed"] for s in CHECKED)
    assert changed >= 200, changed


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_with_options_equals_transformers(loaded, name):
    """Every row whose decisions hold by a margin (transformers' ``min_margin``) is identical; an
    n-gram ban of size 1 on sentencepiece pieces leaves some models near-uniform choices."""
    pre, options = loaded
    setting, record = options["settings"][name], options["hf"][name]
    theirs, ours = _single(record), _ours(pre, options, setting)
    decided = [b for b, margin in enumerate(record["min_margin"]) if margin > MARGIN]
    assert len(decided) >= len(theirs) // 2, record["min_margin"]
    differ = [(b, ours[b], theirs[b]) for b in decided if ours[b] != theirs[b]]
    assert not differ, differ


@pytest.mark.parametrize("name", BEAM)
def test_beam_search_with_an_ngram_ban_agrees_with_transformers(loaded, name):
    """transformers' beam search keeps finished hypotheses aside, OpenNMT-tf's (jaxformer's) keeps
    them in the beam: the same as plain beam search, most rows agree (14 or more of 16)."""
    pre, options = loaded
    setting, record = options["settings"][name], options["hf"][name]
    theirs, ours = _single(record), _ours(pre, options, setting)
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) >= len(theirs) - 2


def test_generate_on_the_command_line(loaded, capsys, monkeypatch):
    """``jaxformer generate --model DIR``: prompts on stdin, transformers' greedy continuations out."""
    from jaxformer.cli import main

    pre, _ = loaded
    goldens = json.loads((pre.path / "goldens.json").read_text())
    prompts = [p["text"] for p in goldens["prompts"][:6]]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts) + "\n"))
    argv = ["generate", "--model", str(pre.path), "--max-length", "20", "--no-return-prompt"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == goldens["greedy"]["texts"][:6]
