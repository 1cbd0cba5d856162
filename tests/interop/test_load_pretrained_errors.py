"""``load_pretrained`` refuses what it cannot load faithfully, naming the file, the tensor and what is
supported (on copies of the committed fixtures in ``tmp_path``; the fixtures are never modified)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxformer
from jaxformer.interop.weights import CheckpointError

HF = Path(__file__).parents[1] / "data" / "hf"


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


# --- Decoder-only checkpoints (tests/data/hf_lm) -------------------------------------------------

HF_LM = Path(__file__).parents[1] / "data" / "hf_lm"
DELETE = object()


def _lm(tmp_path: Path, name: str, file: str = "config.json", **changes) -> Path:
    """A copy of the decoder-only fixture ``name`` with ``changes`` made to the JSON ``file``
    (``DELETE`` removes a field)."""
    directory = tmp_path / name
    if not directory.exists():
        shutil.copytree(HF_LM / name, directory)
    path = directory / file
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return directory


def test_an_unknown_decoder_only_type_is_refused_naming_the_known_ones(tmp_path):
    directory = _lm(tmp_path, "gemma", model_type="gemma2")
    with pytest.raises(CheckpointError) as error:
        jaxformer.load_pretrained(directory)
    message = str(error.value)
    assert message.startswith(f"{directory / 'config.json'}: model_type 'gemma2' is not supported")
    assert "\n" not in message
    for known in ("bart", "gemma", "gpt2", "llama", "m2m_100", "marian", "mistral", "qwen2", "t5"):
        assert known in message


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize(
    "name, changes, message",
    [
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
        ("llama", {"rope_scaling": {**LLAMA3, "beta_fast": 32}}, r"unknown keys \['beta_fast'\]"),
        (
            "llama_linear",
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            "rope_parameters type 'longrope'",
        ),
        ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ("llama", {"hidden_act": "mish"}, "hidden_act='mish' is not supported"),
        ("llama", {"quantization_config": {"quant_method": "gptq"}}, r"quantization_config \(gptq\)"),
        ("gemma", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 .*soft-capping"),
        ("gemma", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
        ("gemma", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar=256 .*head_dim 16"),
        ("gemma", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True .*max_window_layers"),
        (
            "qwen2",
            {"layer_types": ["full_attention", "sliding_attention"]},
            r"layer_types=\['full_attention', 'sliding_attention'\]",
        ),
        ("mistral", {"attention_bias": True}, "attention_bias=True .*no biases"),
        ("mistral", {"mlp_bias": True}, "mlp_bias=True"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention=True"),
    ],
)  # fmt: skip
def test_a_config_field_that_changes_the_computation_is_refused_by_name(
    tmp_path, name, changes, message
):
    directory = _lm(tmp_path, name, **changes)
    with pytest.raises(CheckpointError, match=rf"config\.json: .*{message}") as error:
        jaxformer.load_pretrained(directory)
    assert "\n" not in str(error.value)


def test_fields_that_change_nothing_here_are_accepted(tmp_path):
    """Gemma's ``query_pre_attn_scalar`` equal to ``head_dim``, a llama's ``rope_type`` "default"
    (no scaling) and ``partial_rotary_factor`` 1: the same model."""
    gemma = jaxformer.load_pretrained(_lm(tmp_path, "gemma", query_pre_attn_scalar=16))
    assert gemma.config.head_dim == 16
    plain = _lm(tmp_path, "mistral", rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    plain = jaxformer.load_pretrained(_lm(tmp_path, "mistral", partial_rotary_factor=1.0))
    assert plain.config.rope_scaling is None and plain.config.sliding_window == 8


def test_llama_biases_are_read_when_the_config_has_them(tmp_path):
    """``attention_bias`` / ``mlp_bias`` (Llama): the biases are parameters; zero biases change
    nothing, and a bias the config implies but the file lacks is named."""
    directory = _lm(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.layers\.0\..*\.bias'"):
        jaxformer.load_pretrained(directory)

    def add_zero_biases(tensors):
        for name in [n for n in tensors if n.startswith("model.layers.")]:
            if name.endswith("_proj.weight"):
                rows = tensors[name].shape[0]
                tensors[name.removesuffix("weight") + "bias"] = np.zeros(rows, np.float32)

    _edit_tensors(directory, add_zero_biases)
    biased = jaxformer.load_pretrained(directory)
    plain = jaxformer.load_pretrained(HF_LM / "llama")
    layer = biased.params["decoder"]["layer_0"]
    assert layer["self_attention"]["kv"]["bias"].shape == (2, 2, 16)  # [2, K, H]
    assert layer["ffn"]["inner_linear"]["bias"].shape == (128,)
    ids = jnp.asarray([[299, 256, 285, 294]])
    np.testing.assert_array_equal(
        biased.model.apply({"params": biased.params}, ids),
        plain.model.apply({"params": plain.params}, ids),
    )


def test_gpt2_files_in_the_original_naming_load_the_same(tmp_path):
    """openai-community/gpt2's own file: no ``transformer.`` prefix, the causal mask stored as
    ``attn.bias`` / ``attn.masked_bias`` buffers (not parameters: not read), ``lm_head`` absent."""
    directory = _lm(tmp_path, "gpt2")

    def rename(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors["h.0.attn.masked_bias"] = np.asarray(-1e4, np.float32)

    _edit_tensors(directory, rename)
    renamed, original = (
        jaxformer.load_pretrained(directory),
        jaxformer.load_pretrained(HF_LM / "gpt2"),
    )
    for a, b in zip(jax.tree.leaves(renamed.params), jax.tree.leaves(original.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_special_ids_without_a_generation_config(tmp_path):
    """config.json's ids when generation_config.json is absent; no pad id: the first EOS."""
    directory = _lm(tmp_path, "qwen2")
    (directory / "generation_config.json").unlink()
    pre = jaxformer.load_pretrained(directory)
    assert (pre.start_id, pre.end_id, pre.pad_id) == (299, 301, 301)
    assert pre.config.pad_id == 301 and pre.generation.max_length is None
    _lm(tmp_path, "qwen2", eos_token_id=[301, 299], bos_token_id=DELETE)
    pre = jaxformer.load_pretrained(directory)
    assert (pre.start_id, pre.end_id, pre.pad_id) == (None, (301, 299), 301)
    _lm(tmp_path, "qwen2", eos_token_id=400)
    with pytest.raises(
        CheckpointError, match=r"eos_token_id=400 is not a token id of the model's 320"
    ):
        jaxformer.load_pretrained(directory)


def test_the_tokenizer_adds_bos_as_tokenizer_config_says(tmp_path):
    directory = _lm(tmp_path, "mistral", "tokenizer_config.json", add_bos_token=False)
    tokenizer = jaxformer.load_pretrained(directory).target_tokenizer
    with_bos = jaxformer.load_pretrained(HF_LM / "mistral").target_tokenizer
    assert with_bos.encode("lo toru") == [1, *tokenizer.encode("lo toru")]
    # Without the setting, tokenizer.json's post-processor decides (it adds <s> here).
    _lm(tmp_path, "mistral", "tokenizer_config.json", add_bos_token=DELETE)
    assert jaxformer.load_pretrained(directory).target_tokenizer.encode("lo toru")[0] == 1


def test_generation_config_settings_become_defaults_or_are_listed(tmp_path):
    directory = _lm(
        tmp_path, "gpt2", "generation_config.json", do_sample=True, temperature=0.7, top_p=0.9,
        max_new_tokens=DELETE, max_length=30, repetition_penalty=1.3, min_p=0.05,
    )  # fmt: skip
    pre = jaxformer.load_pretrained(directory)
    options = pre.decode_options()
    assert (options.sampling_topk, options.sampling_temperature, options.top_p) == (50, 0.7, 0.9)
    assert options.repetition_penalty == 1.3 and options.max_length == 30
    assert any("max_length=30 counts the prompt" in note for note in pre.generation.ignored)
    assert any("min_p=0.05" in note for note in pre.generation.ignored)
    greedy = pre.decode_options(beam_size=2)  # choosing the search drops the sampling defaults
    assert (greedy.beam_size, greedy.sampling_topk, greedy.sampling_temperature) == (2, 1, 1.0)


def test_param_dtype_mesh_and_the_text_calls_of_the_other_kind(tmp_path):
    gemma = jaxformer.load_pretrained(HF_LM / "gemma", param_dtype="bfloat16")
    table = gemma.params["embedding"]["embedding"]
    stored = load_file(str(HF_LM / "gemma" / "model.safetensors"))["model.embed_tokens.weight"]
    assert table.dtype == jnp.bfloat16 and stored.dtype == table.dtype  # stored in bfloat16: as is
    assert np.array_equal(np.asarray(table), stored)
    short = jaxformer.load_pretrained(HF_LM / "gpt2", max_len=32)  # the position table's first rows
    assert short.config.max_len == 32 and short.params["positions"]["embedding"].shape == (32, 32)
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        jaxformer.load_pretrained(HF_LM / "gemma", param_dtype="int8")
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh .*got object"):
        jaxformer.load_pretrained(HF_LM / "gemma", mesh=object())
    with pytest.raises(ValueError, match=r"decoder-only language model .*pre\.generate"):
        gemma.translate(["lo toru"])
    marian = jaxformer.load_pretrained(HF / "marian")
    with pytest.raises(ValueError, match=r"translation model .*pre\.translate"):
        marian.generate(["ka"])


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_a_damaged_shard_is_refused_naming_it(tmp_path, keep):
    """Cut in its tensors' bytes or in its header: one line naming the shard, before any read."""
    directory = _lm(tmp_path, "llama_linear")
    shard = directory / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: max(int(len(data) * keep), 4)])
    with pytest.raises(CheckpointError) as error:
        jaxformer.load_pretrained(directory)
    assert str(error.value).startswith(f"{shard}: not a readable safetensors file (truncated")
    assert "\n" not in str(error.value)
