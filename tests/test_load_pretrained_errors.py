"""``load_pretrained`` refuses what it cannot load faithfully, naming the file, the tensor and what is
supported (on copies of the committed fixtures in ``tmp_path``; the fixtures are never modified)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxformer
from jaxformer.interop.weights import CheckpointError

HF = Path(__file__).parent / "data" / "hf"


def _copy(tmp_path: Path, name: str = "bart") -> Path:
    directory = tmp_path / name
    shutil.copytree(HF / name, directory)
    return directory


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = dict(load_file(str(path)))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_a_pytorch_only_directory_is_refused(tmp_path):
    directory = _copy(tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        jaxformer.load_pretrained(directory)


def test_an_unknown_model_type_is_refused(tmp_path):
    directory = _copy(tmp_path)
    _edit_config(directory, model_type="pegasus")
    with pytest.raises(
        CheckpointError, match=r"config\.json: model_type 'pegasus' is not supported"
    ):
        jaxformer.load_pretrained(directory)


def test_a_missing_tensor_is_named(tmp_path):
    directory = _copy(tmp_path)
    name = "model.encoder.layers.0.fc1.weight"
    _edit_tensors(directory, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"no tensor '{name}'.*model\.safetensors"):
        jaxformer.load_pretrained(directory)


def test_a_mis_shaped_tensor_is_named(tmp_path):
    directory = _copy(tmp_path)
    name = "model.decoder.layers.1.encoder_attn.k_proj.weight"

    def shrink(tensors):
        tensors[name] = np.ascontiguousarray(tensors[name][:-1])

    _edit_tensors(directory, shrink)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' .* has shape .* implies"):
        jaxformer.load_pretrained(directory)


def test_a_tensor_the_config_does_not_explain_is_refused(tmp_path):
    directory = _copy(tmp_path)

    def add(tensors):
        tensors["model.encoder.layers.0.extra_gate.weight"] = np.zeros((4, 4), np.float32)

    _edit_tensors(directory, add)
    with pytest.raises(
        CheckpointError, match=r"does not explain: 'model\.encoder\.layers\.0\.extra"
    ):
        jaxformer.load_pretrained(directory)


def test_a_config_jaxformer_cannot_express_is_refused(tmp_path):
    directory = _copy(tmp_path)
    width = json.loads((directory / "config.json").read_text())["decoder_ffn_dim"]
    _edit_config(directory, decoder_ffn_dim=7)
    with pytest.raises(
        CheckpointError, match=r"encoder_ffn_dim=\d+ differs from decoder_ffn_dim=7"
    ):
        jaxformer.load_pretrained(directory)
    _edit_config(directory, decoder_ffn_dim=width, activation_function="mish")
    with pytest.raises(CheckpointError, match="activation_function='mish' is not supported"):
        jaxformer.load_pretrained(directory)


def test_a_sharded_checkpoint_loads_like_one_file(tmp_path):
    """``model.safetensors.index.json`` + shards (how large models are saved) gives the same params."""
    directory = _copy(tmp_path)
    tensors = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / file))
        weight_map.update(dict.fromkeys(keys, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, whole = jaxformer.load_pretrained(directory), jaxformer.load_pretrained(HF / "bart")
    import jax

    for a, b in zip(
        jax.tree_util.tree_leaves(sharded.params),
        jax.tree_util.tree_leaves(whole.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"lists model-00002-of-00002\.safetensors, which is missing"
    ):
        jaxformer.load_pretrained(directory)


def test_neither_kind_of_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither a Hugging Face model directory"):
        jaxformer.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        jaxformer.load_pretrained(tmp_path / "absent")
    with pytest.raises(TypeError, match="unknown hint"):
        jaxformer.load_pretrained(HF / "bart", num_heads=4)
