"""OpenNMT-tf run configurations (the YAML given to ``onmt-main --config``): their decoding settings.

    run = read_opennmt_config("run.yml")
    options = DecodeOptions(**run.decoding)            # beam_width -> beam_size, ...
    run.vocabularies                                   # data/source_vocabulary, target_vocabulary

OpenNMT-tf users decode with the ``params`` and ``infer`` sections of such a file
(https://opennmt.net/OpenNMT-tf/configuration.html). This reads those that jaxformer's search
reproduces, under jaxformer's names:

==============================  ===================================  ================
OpenNMT-tf                      jaxformer (``DecodeOptions``)        OpenNMT-tf default
==============================  ===================================  ================
``params/beam_width``           ``beam_size``                        1
``params/length_penalty``       ``length_penalty``                   0
``params/coverage_penalty``     ``coverage_penalty``                 0
``params/sampling_topk``        ``sampling_topk``                    1
``params/sampling_temperature`` ``sampling_temperature``             1
``params/maximum_decoding_length``  ``max_length``                   250
``params/minimum_decoding_length``  ``min_length``                   0
``params/num_hypotheses``,      ``n_best``                           1
``infer/n_best``
==============================  ===================================  ================

``infer/batch_size`` and ``infer/with_scores`` are read too (``run.batch_size``, ``run.with_scores``).
Settings that would change the outputs and that jaxformer does not reproduce (``decoding_noise``,
``replace_unknown_target: true``, ``with_alignments``, ``num_hypotheses: 0``) are refused by name;
training settings are not read. ``data/source_vocabulary`` and ``data/target_vocabulary`` are
resolved as ``onmt-main`` resolves them: relative to ``model_dir`` when the file exists there, else
as written (relative to the current directory).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxformer.decoding.options import require_int, require_number
from jaxformer.interop.weights import CheckpointError

# OpenNMT-tf's name -> jaxformer's (DecodeOptions field)
PARAMS = {
    "beam_width": "beam_size",
    "length_penalty": "length_penalty",
    "coverage_penalty": "coverage_penalty",
    "sampling_topk": "sampling_topk",
    "sampling_temperature": "sampling_temperature",
    "maximum_decoding_length": "max_length",
    "minimum_decoding_length": "min_length",
    "num_hypotheses": "n_best",
}
# Settings whose neutral value is accepted and any other refused (they change the outputs).
UNSUPPORTED = {
    ("params", "decoding_noise"): None,
    ("params", "replace_unknown_target"): False,
    ("infer", "with_alignments"): None,
}


@dataclasses.dataclass(frozen=True)
class OpennmtRunConfig:
    path: Path
    decoding: dict[str, Any]  # DecodeOptions keyword arguments, only those the file sets
    batch_size: int | None = None
    with_scores: bool | None = None
    vocabularies: tuple[Path | None, Path | None] = (None, None)  # source, target


def read_opennmt_config(path: str | Path, model_dir: str | Path | None = None) -> OpennmtRunConfig:
    """The decoding settings of an OpenNMT-tf run configuration (see the module docstring).

    ``model_dir``: where relative vocabulary paths are looked up first (default: the file's own
    ``model_dir`` entry)."""
    path = Path(path)
    raw = _load_yaml(path)
    params, infer = _section(raw, "params", path), _section(raw, "infer", path)
    for (section, name), neutral in UNSUPPORTED.items():
        value = {"params": params, "infer": infer}[section].get(name, neutral)
        if value != neutral:
            raise CheckpointError(
                f"{path}: {section}/{name}: {value!r} is not reproduced by jaxformer (remove it, "
                "or decode with onmt-main)"
            )
    decoding = {
        ours: _checked(f"{path}: params/{theirs}", ours, params[theirs])
        for theirs, ours in PARAMS.items()
        if theirs in params
    }
    if "n_best" in infer:  # infer/n_best sets params/num_hypotheses in OpenNMT-tf
        decoding["n_best"] = _checked(f"{path}: infer/n_best", "n_best", infer["n_best"])
    batch_size = infer.get("batch_size")
    if batch_size is not None:
        require_int(f"{path}: infer/batch_size", batch_size, 1)
    data = _section(raw, "data", path)
    base = Path(raw.get("model_dir") or model_dir or ".")
    vocabularies = tuple(
        _data_path(data.get(name), base) for name in ("source_vocabulary", "target_vocabulary")
    )
    return OpennmtRunConfig(path, decoding, batch_size, infer.get("with_scores"), vocabularies)


def _checked(where: str, ours: str, value):
    """``value`` checked as ``DecodeOptions.<ours>`` is, named as in the file."""
    if ours in ("length_penalty", "coverage_penalty"):
        return require_number(where, value)
    if ours == "sampling_temperature":
        return require_number(where, value, positive=True)
    low = {"beam_size": 1, "n_best": 1, "max_length": 1}.get(ours, 0)
    if ours == "n_best" and value == 0:
        raise CheckpointError(f"{where}: 0 (all hypotheses) is not supported; give a number >= 1")
    return require_int(where, value, low)


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise FileNotFoundError(f"{path}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise CheckpointError(f"{path}: not valid YAML{line}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: an OpenNMT-tf configuration is a YAML mapping")
    return raw


def _section(raw: dict, name: str, path: Path) -> dict:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise CheckpointError(f"{path}: {name}: must be a mapping, got {section!r}")
    return section


def _data_path(value, base: Path) -> Path | None:
    if value is None:
        return None
    prefixed = base / value
    return prefixed if prefixed.exists() else Path(value)
