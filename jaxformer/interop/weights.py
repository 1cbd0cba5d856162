"""Other frameworks' tensors onto jaxformer's parameter tree, with errors that name the tensor.

Every loader (``huggingface.py``, ``opennmt_tf.py``) reads a flat ``{name: array}`` mapping and
builds the nested parameter dict of a ``Transformer`` from it through a ``Tensors``: each ``take``
checks the tensor exists and has the shape the config implies, and records it as used, so a
checkpoint with tensors the config does not explain (a feature jaxformer would silently ignore)
is refused instead of decoding wrongly.

The layout conversions live here once:

- a dense kernel ``[in, out]`` (Keras/TF) or a torch ``Linear.weight`` ``[out, in]`` (``linear``);
- attention projections to ``qkv [D, 3, N, H]``, ``query [D, N, H]``, ``kv [D, 2, N, H]`` and
  ``out [N, H, D]`` (``self_attention``, ``cross_attention``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that does not fit what its config (or the hints) describe."""


@dataclasses.dataclass
class Tensors:
    """Named arrays of one checkpoint, taken once each; ``where(name)`` says which file holds one."""

    arrays: dict[str, np.ndarray]
    where: Callable[[str], str]  # name -> file, for messages
    what: str  # "the Hugging Face model" / "the OpenNMT-tf checkpoint", for messages
    used: set[str] = dataclasses.field(default_factory=set)

    def has(self, name: str) -> bool:
        return name in self.arrays

    def take(self, name: str, shape: Iterable[int] | None = None) -> np.ndarray:
        """The array ``name`` as float32 (or its integer type), checked against ``shape``."""
        if name not in self.arrays:
            raise CheckpointError(
                f"{self.what} has no tensor {name!r}, which its configuration implies "
                f"(looked in {self.where(name)})"
            )
        array = self.arrays[name]
        if shape is not None and tuple(array.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {self.where(name)} has shape {tuple(array.shape)}, but the "
                f"configuration implies {tuple(shape)}"
            )
        self.used.add(name)
        if np.issubdtype(array.dtype, np.integer):
            return np.asarray(array)
        return np.asarray(array, np.float32)

    def first(self, names: Iterable[str], shape: Iterable[int] | None = None) -> np.ndarray:
        """The first of ``names`` present (tied weights are stored under one of several names)."""
        names = list(names)
        for name in names:
            if name in self.arrays:
                return self.take(name, shape)
        raise CheckpointError(f"{self.what} has none of the tensors {names}")

    def skip(self, predicate: Callable[[str], bool]) -> None:
        """Mark as used the tensors the mapping derives instead of reading (e.g. fixed sinusoids)."""
        self.used.update(name for name in self.arrays if predicate(name))

    def check_all_used(self) -> None:
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            shown = ", ".join(repr(n) for n in unused[:8])
            more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
            raise CheckpointError(
                f"{self.what} has tensors the configuration does not explain: {shown}{more} "
                f"(in {self.where(unused[0])}); jaxformer does not know this model variant"
            )


def linear(weight: np.ndarray, torch_layout: bool) -> np.ndarray:
    """A dense kernel ``[in, out]`` from torch's ``[out, in]`` or Keras's ``[in, out]``."""
    return weight.T if torch_layout else weight


def heads_in(kernel: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """``[D, N*H] -> [D, N, H]`` (a projection into the heads)."""
    return kernel.reshape(kernel.shape[0], num_heads, head_dim)


def heads_out(kernel: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """``[N*H, D] -> [N, H, D]`` (the projection out of the heads)."""
    return kernel.reshape(num_heads, head_dim, kernel.shape[-1])


def dense(kernel: np.ndarray, bias: np.ndarray | None) -> dict[str, Any]:
    return {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}


def attention_params(
    q: tuple[np.ndarray, np.ndarray | None],
    k: tuple[np.ndarray, np.ndarray | None],
    v: tuple[np.ndarray, np.ndarray | None],
    o: tuple[np.ndarray, np.ndarray | None],
    num_heads: int,
    head_dim: int,
    self_attention: bool,
) -> dict[str, Any]:
    """One attention sublayer from ``(kernel [in, out], bias or None)`` per projection.

    Self-attention: ``qkv`` kernel ``[D, 3, N, H]``; cross-attention: ``query [D, N, H]`` and
    ``kv [D, 2, N, H]``; both: ``out [N, H, D]``. Biases follow their kernels' head layout.
    """
    split = lambda pair: (
        heads_in(pair[0], num_heads, head_dim),
        None if pair[1] is None else pair[1].reshape(num_heads, head_dim),
    )
    (qk, qb), (kk, kb), (vk, vb) = split(q), split(k), split(v)
    out_kernel, out_bias = o
    params: dict[str, Any] = {"out": dense(heads_out(out_kernel, num_heads, head_dim), out_bias)}
    stack = lambda parts: None if parts[0] is None else np.stack(parts, axis=0)
    if self_attention:
        params["qkv"] = dense(np.stack([qk, kk, vk], axis=1), stack([qb, kb, vb]))
    else:
        params["query"] = dense(qk, qb)
        params["kv"] = dense(np.stack([kk, vk], axis=1), stack([kb, vb]))
    return params


def norm_params(scale: np.ndarray, bias: np.ndarray | None) -> dict[str, np.ndarray]:
    return {"scale": scale} if bias is None else {"scale": scale, "bias": bias}


def check_tree(params: dict, expected: dict, what: str, path: str = "") -> None:
    """``params`` has exactly ``expected``'s structure and shapes (a loader bug check, named)."""
    if set(params) != set(expected):
        raise CheckpointError(
            f"{what}: parameters at {path or '/'} are {sorted(params)}, the model expects "
            f"{sorted(expected)}"
        )
    for key, value in expected.items():
        here = f"{path}/{key}"
        if isinstance(value, dict):
            check_tree(params[key], value, what, here)
        elif tuple(np.shape(params[key])) != tuple(value.shape):
            raise CheckpointError(
                f"{what}: parameter {here} has shape {np.shape(params[key])}, the model expects "
                f"{tuple(value.shape)}"
            )
