"""The shared mechanism of every importer: a family is a table of names over it.

A family module (``families/*.py``) maps each parameter of the jaxformer model, by its path in the
parameter tree, to a ``Rule`` that reads the checkpoint's tensor(s) for it::

    {
        "embedding/embedding": same("model.embed_tokens.weight"),
        "decoder/layer_0/ffn/outer/kernel": linear("model.layers.0.mlp.down_proj.weight"),
        **attention(c, "decoder/layer_0/self_attention", "model.layers.0.self_attn.{}_proj"),
        ...
    }

``assemble(table, tensors, shapes)`` builds the parameter tree from it, in the spirit of nanoGPT's
``from_pretrained``: names mapped one to one, a few layout conversions, and counts that must match:

- every parameter the model expects (``expected_shapes(model)``: nothing is computed) has exactly
  one rule, and every rule a parameter (else the family module has a bug, which is named);
- a rule knows the parameter's shape from the model, so the tensor shape it implies is checked
  (``tensor 'x' in FILE has shape (...), but the configuration implies (...)``);
- every tensor of the checkpoint is used, or matches the family's ``IGNORED`` patterns (buffers
  such as GPT-2's causal mask, fixed sinusoids): a tensor the config does not explain means a
  variant jaxformer would silently compute wrongly, and is refused.

Tensors are read one at a time (``Tensors`` over lazily read files), each cast to the parameter
dtype and handed to ``place`` as soon as it is built, so the host holds one parameter at a time.

The rules (their ``shape`` argument is the parameter's, from the model):

- ``same(name)``: as stored. ``flat(name)``: stored flat (a bias ``[N*H]`` for ``[N, H]``);
  ``reshaped(name, of)``: stored as ``of(shape)`` (BART's ``final_logits_bias [1, V]``).
- ``linear(name, inputs=1)``: a torch ``Linear.weight [out, in]``, transposed to a kernel
  ``[*in, *out]`` whose first ``inputs`` axes are the input's (``query [D, N, H]`` has 1, the
  attention output ``out [N, H, D]`` has 2). ``kernel(name, inputs=1)``: stored ``[in, out]``
  already (Keras / TensorFlow, GPT-2's ``Conv1D``), reshaped only.
- ``stacked(*rules, axis)``: parameters fused along a new axis (``qkv [D, 3, N, H]`` from q, k, v).
- ``tied(*names)``: the first name present; every other present one is a stored copy, accepted
  when equal (tied embeddings saved under several names).
- ``leading_rows(name)``: the first rows of a longer table (learned positions with a ``max_len``
  hint below the checkpoint's).

Helpers build the entries that recur: ``dense``, ``norm``, ``attention`` (q/k/v/o projections to
jaxformer's fused ``qkv``, or ``query`` + ``kv`` with grouped key/value heads and in
cross-attention), ``ffn``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

Shape = tuple[int, ...]
PARAM_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint that does not fit what its config (or the hints) describe."""


# --- The checkpoint's tensors ----------------------------------------------------------------------


@dataclasses.dataclass
class Tensors:
    """The named tensors of one checkpoint, read one at a time when taken, each taken once.

    ``shapes``: every tensor's shape (known before reading); ``read(name)`` reads one tensor;
    ``where(name)``: the file that holds it, for messages; ``what``: "the Hugging Face model in
    DIR", for messages.
    """

    shapes: Mapping[str, Shape]
    read: Callable[[str], np.ndarray]
    where: Callable[[str], str]
    what: str
    used: set[str] = dataclasses.field(default_factory=set)

    @classmethod
    def of_arrays(cls, arrays: Mapping[str, np.ndarray], where, what: str) -> Tensors:
        """Tensors already in memory (an OpenNMT-tf checkpoint, read and verified whole)."""
        shapes = {name: tuple(array.shape) for name, array in arrays.items()}
        return cls(shapes, arrays.__getitem__, where, what)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> Shape:
        if name not in self.shapes:
            self.missing(name)
        return tuple(self.shapes[name])

    def prefix(self, prefix: str) -> str:
        """``prefix`` if some tensor names start with it, else "" (``model.`` in BART files)."""
        return prefix if any(name.startswith(prefix) for name in self.shapes) else ""

    def missing(self, name: str):
        raise CheckpointError(
            f"{self.what} has no tensor {name!r}, which its configuration implies "
            f"(looked in {self.where(name)})"
        )

    def take(self, name: str, shape: Iterable[int] | None = None) -> np.ndarray:
        """The tensor ``name`` (as stored: float32, bfloat16, ...), checked against ``shape``."""
        found = self.shape(name)
        if shape is not None and found != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {self.where(name)} has shape {found}, but the "
                f"configuration implies {tuple(shape)}"
            )
        self.used.add(name)
        return np.asarray(self.read(name))

    def check_all_used(self, ignored: Iterable[str] = ()) -> None:
        """Every tensor was taken or matches one of the ``ignored`` patterns (regular expressions
        searched in the name)."""
        patterns = [re.compile(p) for p in ignored]
        unused = sorted(
            name
            for name in self.shapes
            if name not in self.used and not any(p.search(name) for p in patterns)
        )
        if unused:
            shown = ", ".join(repr(n) for n in unused[:8])
            more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
            raise CheckpointError(
                f"{self.what} has tensors the configuration does not explain: {shown}{more} "
                f"(in {self.where(unused[0])}); jaxformer does not know this model variant"
            )


# --- Rules: one parameter from the checkpoint's tensors --------------------------------------------


def _size(shape: Iterable[int]) -> int:
    return math.prod(shape)


@dataclasses.dataclass(frozen=True)
class same:
    """The tensor as stored."""

    name: str

    def __call__(self, t: Tensors, shape: Shape) -> np.ndarray:
        return t.take(self.name, shape)


@dataclasses.dataclass(frozen=True)
class reshaped:
    """The tensor stored as ``of(shape)``, reshaped to the parameter's shape."""

    name: str
    of: Callable[[Shape], Shape]

    def __call__(self, t: Tensors, shape: Shape) -> np.ndarray:
        return t.take(self.name, self.of(shape)).reshape(shape)


def flat(name: str) -> reshaped:
    """The tensor stored flat: a bias ``[N*H]`` of a parameter ``[N, H]``."""
    return reshaped(name, lambda shape: (_size(shape),))


@dataclasses.dataclass(frozen=True)
class linear:
    """A torch ``Linear.weight [out, in]`` as a kernel ``[*in, *out]`` (``inputs`` input axes)."""

    name: str
    inputs: int = 1

    def __call__(self, t: Tensors, shape: Shape) -> np.ndarray:
        n_in, n_out = _size(shape[: self.inputs]), _size(shape[self.inputs :])
        return t.take(self.name, (n_out, n_in)).T.reshape(shape)


@dataclasses.dataclass(frozen=True)
class kernel:
    """A kernel stored ``[in, out]`` (Keras, TensorFlow, GPT-2's ``Conv1D``), reshaped to
    ``[*in, *out]`` (``inputs`` input axes)."""

    name: str
    inputs: int = 1

    def __call__(self, t: Tensors, shape: Shape) -> np.ndarray:
        n_in, n_out = _size(shape[: self.inputs]), _size(shape[self.inputs :])
        return t.take(self.name, (n_in, n_out)).reshape(shape)


@dataclasses.dataclass(frozen=True)
class stacked:
    """Parameters fused along a new axis ``axis``: one rule per slice."""

    rules: tuple[Callable, ...]
    axis: int

    def __call__(self, t: Tensors, shape: Shape) -> np.ndarray:
        if shape[self.axis] != len(self.rules):
            raise CheckpointError(
                f"a parameter of shape {shape} stacks {shape[self.axis]} tensors on axis "
                f"{self.axis}, the importer gives {len(self.rules)} (an importer bug)"
            )
        part = shape[: self.axis] + shape[self.axis + 1 :]
        return np.stack([rule(t, part) for rule in self.rules], axis=self.axis)


@dataclasses.dataclass(frozen=True)
class tied:
    """The first of ``names`` present; the others present are stored copies of it (tied weights
    saved more than once), accepted when equal and refused otherwise."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        object.__setattr__(self, "names", names)

    def __call__(self, t: Tensors, shape: Shape) -> np.ndarray:
        present = [name for name in self.names if t.has(name)]
        if not present:
            raise CheckpointError(f"{t.what} has none of the tensors {list(self.names)}")
        table = t.take(present[0], shape)
        for name in present[1:]:
            copy = t.take(name)
            if copy.shape != table.shape or not np.array_equal(copy, table):
                raise CheckpointError(
                    f"tensor {name!r} in {t.where(name)} should be tied to {present[0]!r} (the "
                    "config says so) but differs from it"
                )
        return table


@dataclasses.dataclass(frozen=True)
class leading_rows:
    """The first rows of a table that may have more (positions beyond a ``max_len`` hint)."""

    name: str

    def __call__(self, t: Tensors, shape: Shape) -> np.ndarray:
        found = t.shape(self.name)
        if len(found) != len(shape) or found[0] < shape[0] or found[1:] != shape[1:]:
            raise CheckpointError(
                f"tensor {self.name!r} in {t.where(self.name)} has shape {found}, the "
                f"configuration implies {shape} (or more rows)"
            )
        return t.take(self.name)[: shape[0]]


Rule = Callable[[Tensors, Shape], np.ndarray]
Table = dict[str, Rule]


# --- Entries that recur ----------------------------------------------------------------------------


def dense(ours: str, theirs: str, bias: bool = True, torch: bool = True, inputs: int = 1) -> Table:
    """``{ours}/kernel`` (+ ``bias``) from ``{theirs}.weight`` (+ ``.bias``): a torch ``Linear``
    (``torch``) or a kernel stored ``[in, out]``; biases stored flat."""
    table: Table = {
        f"{ours}/kernel": (linear if torch else kernel)(f"{theirs}.weight", inputs),
    }
    if bias:
        table[f"{ours}/bias"] = flat(f"{theirs}.bias")
    return table


def norm(ours: str, scale: str, bias: str | None = None) -> Table:
    """A norm's ``scale`` (and ``bias``) from the tensors named ``scale`` (and ``bias``)."""
    table: Table = {f"{ours}/scale": same(scale)}
    if bias is not None:
        table[f"{ours}/bias"] = same(bias)
    return table


def attention(
    c,
    ours: str,
    q: str,
    k: str,
    v: str,
    o: str,
    *,
    fused: bool,
    weight: Callable[[str, int], Rule] = linear,
    bias: Callable[[str], str] | None = None,
) -> Table:
    """An attention sublayer from its four projections (``q``, ``k``, ``v``, ``o``: the names of
    their weights). ``fused``: self-attention with as many key/value heads as heads, stored as
    jaxformer's ``qkv [D, 3, N, H]``; otherwise ``query [D, N, H]`` + ``kv [D, 2, K, H]`` (grouped
    or multi-query heads, or cross-attention). ``out [N, H, D]`` either way. ``weight``: how one
    weight is stored (``linear``: torch's ``[out, in]``; ``kernel``: ``[in, out]``). ``bias``:
    the name of a weight's bias (default: ``.weight`` -> ``.bias``); the config says which
    projections have one (``attention_bias``, ``attention_out_bias``)."""
    bias_of = bias or (lambda name: name.removesuffix(".weight") + ".bias")
    table: Table = {f"{ours}/out/kernel": weight(o, 2)}
    if c.has_attention_out_bias:
        table[f"{ours}/out/bias"] = same(bias_of(o))
    if fused:
        table[f"{ours}/qkv/kernel"] = stacked((weight(q, 1), weight(k, 1), weight(v, 1)), 1)
        if c.attention_bias:
            table[f"{ours}/qkv/bias"] = stacked(tuple(flat(bias_of(x)) for x in (q, k, v)), 0)
        return table
    table[f"{ours}/query/kernel"] = weight(q, 1)
    table[f"{ours}/kv/kernel"] = stacked((weight(k, 1), weight(v, 1)), 1)
    if c.attention_bias:
        table[f"{ours}/query/bias"] = flat(bias_of(q))
        table[f"{ours}/kv/bias"] = stacked((flat(bias_of(k)), flat(bias_of(v))), 0)
    return table


def ffn(c, ours: str, inner: str, outer: str, gate_linear: str | None = None, **options) -> Table:
    """A feed-forward sublayer: ``inner`` (gated: the activated projection), ``inner_linear``
    (``gate_linear``, gated activations only), ``outer``, as ``dense`` entries (biases when the
    config has ``ffn_bias``; ``options`` go to ``dense``)."""
    table = dense(f"{ours}/inner", inner, bias=c.ffn_bias, **options)
    if gate_linear is not None:
        table |= dense(f"{ours}/inner_linear", gate_linear, bias=c.ffn_bias, **options)
    return table | dense(f"{ours}/outer", outer, bias=c.ffn_bias, **options)


# --- Building the parameter tree -------------------------------------------------------------------


def expected_shapes(model) -> dict:
    """The parameter tree ``model`` expects, as ``ShapeDtypeStruct`` leaves (nothing computed)."""
    from jaxformer.models.params import init_params

    return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))


def _paths(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out |= _paths(value, path)
        else:
            out[path] = value
    return out


def check_param_dtype(param_dtype: str) -> np.dtype:
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype must be one of {list(PARAM_DTYPES)}, got {param_dtype!r}")
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(param_dtype))


def to_device(path: str, array: np.ndarray) -> jax.Array:
    """The default ``place``: the whole parameter on JAX's default device."""
    return jax.numpy.asarray(array)


def assemble(
    table: Table,
    tensors: Tensors,
    shapes: Mapping,
    *,
    ignored: Iterable[str] = (),
    param_dtype: str = "float32",
    place: Callable[[str, np.ndarray], Any] = to_device,
) -> dict:
    """The parameter tree of ``shapes`` (``expected_shapes(model)``), each parameter built by its
    rule in ``table``, cast to ``param_dtype`` and handed to ``place(path, array)`` at once (the
    place where a mesh will shard each parameter as it is read). Refused, by name: a parameter
    without a rule or a rule without a parameter (an importer bug), a tensor of the wrong shape,
    a tensor left over (not used and not ``ignored``)."""
    dtype = check_param_dtype(param_dtype)
    expected = _paths(shapes)
    lacking = [path for path in expected if path not in table]
    extra = [path for path in table if path not in expected]
    if lacking or extra:
        raise CheckpointError(
            f"{tensors.what}: the importer's table does not fit the model (a jaxformer bug): "
            f"parameters without a rule {lacking[:4]}, rules without a parameter {extra[:4]}"
        )
    built: dict[str, Any] = {}
    for path, rule in table.items():
        shape = tuple(expected[path].shape)
        array = rule(tensors, shape)
        if array.shape != shape:  # a rule that does not honour its shape: a jaxformer bug
            raise CheckpointError(f"{tensors.what}: {path} built as {array.shape}, not {shape}")
        built[path] = place(path, np.ascontiguousarray(array, dtype))
    tensors.check_all_used(ignored)
    tree: dict = {}
    for path in expected:  # the model's order
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = built[path]
    return tree
