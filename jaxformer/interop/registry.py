"""``load_pretrained``: the models people already have, as a jaxformer model and its parameters.

    pre = jaxformer.load_pretrained("opus-mt-en-de")      # a Hugging Face directory
    pre = jaxformer.load_pretrained("Llama-3.2-1B")       # a decoder-only one
    pre = jaxformer.load_pretrained("run/", source_vocabulary="src.txt", target_vocabulary="tgt.txt",
                                    num_heads=8)          # an OpenNMT-tf V2 checkpoint directory

A directory with ``config.json`` is read as Hugging Face's: its ``model_type`` picks the family
module in ``HUGGING_FACE`` (``families/*.py``; ``huggingface.py`` reads the directory). A directory
with a ``checkpoint`` file or ``ckpt-N.index`` files, or a checkpoint prefix, is read as
OpenNMT-tf's (``opennmt_tf.py``). Neither needs torch, transformers or TensorFlow.

Adding a Hugging Face family: its module in ``families/`` and one line in ``HUGGING_FACE``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import jax

from jaxformer.interop import huggingface, opennmt_tf
from jaxformer.interop.families import bart, gemma, gpt2, llama, m2m100, marian, qwen2, t5
from jaxformer.interop.pretrained import Pretrained
from jaxformer.interop.weights import CheckpointError, check_param_dtype, to_device

# config.json's model_type -> the family module that imports it.
HUGGING_FACE: dict[str, ModuleType] = {
    "marian": marian,
    "m2m100": m2m100,
    "bart": bart,
    "mbart": bart,
    "t5": t5,
    "mt5": t5,
    "gpt2": gpt2,
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen2,
    "gemma": gemma,
}
ALIASES = {"m2m_100": "m2m100"}  # transformers' spelling in M2M100 / NLLB config.json files


def load_pretrained(
    path: str | Path, *, param_dtype: str = "float32", mesh=None, **hints
) -> Pretrained:
    """A Hugging Face model directory or an OpenNMT-tf checkpoint, loaded without its framework.

    ``param_dtype``: the parameters' dtype ("float32", "bfloat16", "float16"); a tensor stored in
    that dtype is never widened, and the activations follow it unless the ``dtype`` hint says
    otherwise (``param_dtype="bfloat16"``: weights, activations and KV cache in bfloat16; softmax,
    logits and scores stay float32). ``mesh`` (a
    ``jaxformer.sharding.make_mesh(data, model)``): each tensor, read one at a time, is placed in
    slices on the mesh by the partition rules of ``jaxformer.training.sharding`` (each device
    receives only its slice); ``generate`` then runs on the mesh (``shard_batch`` the inputs).

    Hints (Hugging Face): ``max_len`` (longest sequence; T5 has no position table, 1024 by
    default; other families are bounded by their position table), ``dtype`` (activations:
    "float32", "bfloat16"). OpenNMT-tf: see ``opennmt_tf.py``.
    """
    check_param_dtype(param_dtype)
    place = _placement(mesh)
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        _check_hints(hints, huggingface.HINTS, "a Hugging Face model")
        cfg = huggingface.read_config(path, ALIASES)
        family = HUGGING_FACE.get(cfg.model_type)
        if family is None:
            raise CheckpointError(
                f"{cfg.path}: model_type {cfg.model_type!r} is not supported; jaxformer loads "
                f"{', '.join(known_model_types())}"
            )
        return huggingface.load(path, family, cfg, param_dtype=param_dtype, place=place, **hints)
    if opennmt_tf.is_checkpoint(path):
        _check_hints(hints, opennmt_tf.HINTS, "an OpenNMT-tf checkpoint")
        return opennmt_tf.load(path, param_dtype=param_dtype, place=place, **hints)
    if not path.exists():
        raise FileNotFoundError(f"load_pretrained: {path} does not exist")
    raise CheckpointError(
        f"load_pretrained: {path} is neither a Hugging Face model directory (config.json with "
        "*.safetensors) nor an OpenNMT-tf checkpoint (a directory with a `checkpoint` file or "
        "ckpt-N.index files, or a checkpoint prefix such as run/ckpt-5000)"
    )


def known_model_types() -> list[str]:
    """The ``model_type`` values load_pretrained reads, as config.json files spell them."""
    internal = {name: spelling for spelling, name in ALIASES.items()}
    return sorted(internal.get(name, name) for name in HUGGING_FACE)


def _placement(mesh):
    """Where each parameter goes as soon as it is built (``weights.assemble``'s ``place``): the
    default device, or its slices of ``mesh`` by the partition rules of ``training.sharding`` (heads
    and feed-forward columns over ``"model"``; key/value heads too where ``"model"`` divides them):
    ``jax.make_array_from_callback`` hands each device only its slice of the host array."""
    if mesh is None:
        return to_device
    from jax.sharding import Mesh, NamedSharding

    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh (jaxformer.sharding.make_mesh(data, model)), got "
            f"{type(mesh).__name__}"
        )
    from jaxformer.training.sharding import partition_spec

    def place(path: str, array):
        sharding = NamedSharding(mesh, partition_spec(path, array.shape, mesh))
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place


def _check_hints(hints: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(hints) - set(allowed))
    if unknown:
        raise TypeError(
            f"load_pretrained: unknown hint(s) {unknown} for {what}; allowed: {allowed}"
        )
