"""Data + tensor parallelism: the rules table, the mesh, and one device vs a 4 x 2 mesh of CPU devices.

The 8-device checks run once, in a subprocess (``tests/sharding_worker.py``): this process has already
initialised JAX with one CPU device, and ``--xla_force_host_platform_device_count`` only acts before
JAX starts. The subprocess runs every computation twice, on one device and on the ("data" 4, "model"
2) mesh, and these tests compare the two.

Tolerances. The sharded run adds the same numbers in another order: gradients are summed per data
shard then all-reduced, and the out / outer projections sum partial products per model shard. Float32
rounding then differs by a few ulps per operation (relative ~1e-7), so losses, gradient norms and
log-probabilities are compared at rtol 1e-5 and parameters after 3 Adam steps at rtol 1e-5 with atol
2e-6 (entries near zero). Token ids must be identical. The worker trains with ``adam_epsilon=1e-3``:
with the default 1e-7, Adam's ``g / (sqrt(v) + eps)`` maps the rounding noise of gradients that are
zero in exact arithmetic (the key biases: softmax ignores a shift of every score) to updates of
±learning rate, on one device and on eight alike, and such entries cannot agree to any tolerance.

``fit`` with the mesh from the config (``run.mesh_data=4, run.mesh_model=2``) is checked the same
way: the worker trains steps 1-2 of the smoke config on one device, resumes steps 3-4 on the 4 x 2
mesh from that checkpoint, and trains steps 1-4 on one device; losses, gradient norms and held-out
losses of every step agree at rtol 1e-5 (also ``adam_epsilon=1e-3``), and so do the parameters the
mesh run saved, loaded here, in a process of one device, at rtol 1e-5 / atol 2e-6.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxformer import DecoderOnlyLM, Transformer, init_params, preset
from jaxformer.training import sharding as shd
from jaxformer.training.experiment import load_config, override
from jaxformer.training.fit import fit, make_run_mesh
from jaxformer.training.runs import load_run
from jaxformer.training.step import TrainConfig, create_train_state

from helpers import EXPERIMENTS

# Its costly fixture runs once per process (session scope: a module fixture is set up again whenever
# xdist interleaves another module), so keep the module on one worker (`make test`: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("sharding_worker")

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).parents[1] / "sharding_worker.py"
RTOL, PARAM_ATOL = 1e-5, 2e-6


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
    """``(arrays, info)`` of one run of the worker on 8 simulated CPU devices."""
    out = tmp_path_factory.mktemp("sharding")
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # Optimisation level 0 halves XLA's compile time; both runs compile with it.
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8 "
        "--xla_backend_optimization_level=0".strip(),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    done = subprocess.run(
        [sys.executable, str(WORKER), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    with np.load(out / "arrays.npz") as arrays:
        return dict(arrays), json.loads((out / "info.json").read_text())


# --- the 8-device subprocess ----------------------------------------------------------------------


def test_the_worker_ran_on_a_4_by_2_mesh(worker):
    _, info = worker
    assert info["device_count"] == 8
    assert info["mesh"] == {"data": 4, "model": 2}


def test_sharded_training_matches_one_device(worker):
    arrays, _ = worker
    single_losses = arrays["single/losses"]
    assert single_losses.shape == (3,) and np.all(np.isfinite(single_losses))
    assert len(set(single_losses.tolist())) == 3  # the steps really change the model
    np.testing.assert_allclose(arrays["sharded/losses"], single_losses, rtol=RTOL)
    np.testing.assert_allclose(arrays["sharded/grad_norms"], arrays["single/grad_norms"], rtol=RTOL)
    names = sorted(k.removeprefix("single/") for k in arrays if k.startswith("single/params/"))
    assert len(names) > 20
    assert names == sorted(k.removeprefix("sharded/") for k in arrays if "sharded/params/" in k)
    for name in names:
        np.testing.assert_allclose(
            arrays[f"sharded/{name}"],
            arrays[f"single/{name}"],
            rtol=RTOL,
            atol=PARAM_ATOL,
            err_msg=name,
        )


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_sharded_decoding_matches_one_device(worker, search):
    arrays, info = worker
    ids = arrays[f"single/{search}/ids"]
    assert ids.shape == (8, 1 if search == "greedy" else 3, 10)
    np.testing.assert_array_equal(arrays[f"sharded/{search}/ids"], ids)
    np.testing.assert_array_equal(
        arrays[f"sharded/{search}/lengths"], arrays[f"single/{search}/lengths"]
    )
    for field in ("log_probs", "scores"):
        reference = arrays[f"single/{search}/{field}"]
        assert np.all(np.isfinite(reference)) and np.all(reference < 0)
        np.testing.assert_allclose(arrays[f"sharded/{search}/{field}"], reference, rtol=RTOL)
    if search == "beam":  # three different hypotheses per row, best first
        assert all(len({tuple(h) for h in row}) == 3 for row in ids.tolist())
    assert info[f"{search}_ids_spec"] == "P('data',)"  # the output stays batch-sharded


def test_params_optimizer_state_and_batch_are_sharded(worker):
    _, info = worker
    state = info["state"]

    def layout(name):
        entry = state[name]
        assert entry["devices"] == 8, name
        return entry["spec"], entry["shard_shapes"]

    # Heads (N = 4) and the feed-forward width (F = 64) split in 2 over "model", after 3 steps.
    for name in ("qkv", "qkv_mu", "qkv_nu"):
        assert layout(name) == ([None, None, "model"], [[32, 3, 2, 8]]), name
    assert layout("kv") == ([None, None, "model"], [[32, 2, 2, 8]])
    assert layout("query") == ([None, "model"], [[32, 2, 8]])
    assert layout("out") == (["model"], [[2, 8, 32]])
    assert layout("inner") == ([None, "model"], [[32, 32]])
    assert layout("inner_bias") == (["model"], [[32]])
    for name in ("outer", "outer_mu"):
        assert layout(name) == (["model"], [[32, 32]]), name
    # Embeddings, the output layer, norms and scalars: whole on every device.
    assert layout("embedding") == ([], [[32, 32]])
    assert layout("output") == ([], [[32, 32]])
    assert layout("norm") == ([], [[32]])
    assert layout("step") == ([], [[]])
    assert layout("adam_count") == ([], [[]])
    # The batch of 8 rows: 2 rows per data shard.
    batch = info["batch"]
    assert batch["src"]["spec"] == ["data"] and batch["src"]["shard_shapes"] == [[2, 6]]
    assert batch["tgt_in"]["shard_shapes"] == [[2, 7]] and batch["tgt_out"]["devices"] == 8


def test_errors_that_need_several_devices_name_the_parameter(worker):
    _, info = worker
    errors = info["errors"]
    assert "data * model = 3 * 1 = 3 must divide the number of devices (8)" in errors["mesh_3"]
    assert "[1, 2, 4, 8]" in errors["mesh_3"]
    assert "6 rows" in errors["batch_6"] and "data axis (4)" in errors["batch_6"]
    assert "'heads' dimension (4)" in errors["strict_8"] and "'model'" in errors["strict_8"]
    assert "attention" in errors["strict_8"] and "strict=False" in errors["strict_8"]
    # Without strict, the 4 heads are replicated on model=8 and F=64 is still split.
    assert info["heads_on_8"] == "P()"
    assert info["mlp_on_8"] == "P(None, 'model')"


def test_fit_on_the_mesh_of_the_config_matches_one_device(worker):
    arrays, info = worker
    for metric, steps in (
        ("train/loss", [1, 2, 3, 4]),
        ("train/grad_norm", [1, 2, 3, 4]),
        ("valid/loss", [2, 4]),
    ):
        reference = arrays[f"fit/one_device/{metric}"]
        assert arrays[f"fit/one_device/{metric}/steps"].tolist() == steps, metric
        assert arrays[f"fit/mixed/{metric}/steps"].tolist() == steps, metric
        assert np.all(np.isfinite(reference)) and len(set(reference.tolist())) == len(steps)
        # Steps 1-2 on one device, 3-4 on the mesh (resumed from the one-device checkpoint).
        np.testing.assert_allclose(
            arrays[f"fit/mixed/{metric}"], reference, rtol=RTOL, err_msg=metric
        )
    # The mesh run decoded the held-out set for BLEU at its last step, on the sharded parameters.
    assert arrays["fit/mixed/valid/bleu/steps"].tolist() == [2, 4]
    assert arrays["fit/mixed/valid/bleu"][-1] == arrays["fit/one_device/valid/bleu"][-1]
    # It did run on the mesh: one compiled sharded step (one batch shape), and the checkpoint of
    # step 4 stored the 4 x 2 layout (heads split over "model"), step 2 the single device's.
    fit_info = info["fit"]
    assert fit_info["sharded_step_compilations"] == 1
    assert fit_info["stored"]["4"] == {
        "type": "NamedShardingMetadata",
        "mesh": [4, 2],
        "spec": [None, None, "model"],
    }
    assert fit_info["stored"]["2"]["type"] == "SingleDeviceShardingMetadata"
    # Held-out batches of 8 rows are split 4 ways; 6 rows (not a multiple of 4) are replicated.
    assert fit_info["placed"]["8"]["spec"] == ["data"]
    assert fit_info["placed"]["8"]["shard_shapes"] == [[2, 5]]
    assert fit_info["placed"]["6"]["spec"] == [] and fit_info["placed"]["6"]["devices"] == 8
    assert fit_info["placed"]["6"]["shard_shapes"] == [[6, 5]]


def test_a_checkpoint_loads_straight_onto_the_mesh(worker):
    """``load_pretrained(dir, mesh=...)``: each tensor placed in its slices as it is read (heads
    and feed-forward columns over "model", key/value heads too), the same logits and greedy ids."""
    arrays, info = worker
    placed = info["loaded"]
    assert placed["query"]["spec"] == [None, "model"] and placed["query"]["shard_shapes"] == [
        [64, 2, 16]
    ]
    assert placed["kv"]["spec"] == [None, None, "model"] and placed["kv"]["shard_shapes"] == [
        [64, 2, 1, 16]
    ]
    assert placed["out"]["spec"] == ["model"] and placed["inner"]["spec"] == [None, "model"]
    assert placed["embedding"]["spec"] == [] and placed["query"]["devices"] == 8
    np.testing.assert_allclose(
        arrays["loaded/mesh/logits"], arrays["loaded/one_device/logits"], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(arrays["loaded/mesh/greedy"], arrays["loaded/one_device/greedy"])


def test_a_checkpoint_saved_on_the_mesh_loads_on_one_device(worker):
    _, info = worker
    workdirs = info["fit"]["workdirs"]
    assert jax.device_count() == 1  # this process: another topology than the one that saved
    mesh_run = load_run(workdirs["mixed"], "latest")
    reference = load_run(workdirs["one_device"], "latest")
    assert mesh_run.step == reference.step == 4
    leaves = jax.tree_util.tree_flatten_with_path(mesh_run.params)[0]
    assert len(leaves) > 20 and jax.tree.structure(mesh_run.params) == jax.tree.structure(
        reference.params
    )
    for (path, got), want in zip(leaves, jax.tree.leaves(reference.params), strict=True):
        np.testing.assert_allclose(
            got, want, rtol=RTOL, atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path)
        )


# --- rules and errors, in this process ------------------------------------------------------------

# The layout the rules must give on a mesh with model=2, written out by hand: (path suffix, spec).
EXPECTED = (
    ("qkv/kernel", P(None, None, "model")),
    ("qkv/bias", P(None, "model")),
    ("kv/kernel", P(None, None, "model")),
    ("kv/bias", P(None, "model")),
    ("query/kernel", P(None, "model")),
    ("query/bias", P("model")),
    ("out/kernel", P("model")),
    ("ffn/inner/kernel", P(None, "model")),
    ("ffn/inner/bias", P("model")),
    ("ffn/outer/kernel", P("model")),
)


def expected_spec(path: str) -> P:
    for suffix, spec in EXPECTED:
        if path == suffix or path.endswith("/" + suffix):
            return spec
    return P()


def leaf_specs(tree, mesh, **kwargs):
    specs = shd.param_specs(tree, mesh, **kwargs)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {jax.tree_util.keystr(kp, simple=True, separator="/"): spec for kp, spec in flat}


MODELS = {
    "transformer": (Transformer, {}),
    "transformer_relative_tied": (
        Transformer,
        dict(maximum_relative_position=3, share_embeddings=True, share_output_embeddings=True),
    ),
    "decoder_only": (DecoderOnlyLM, {}),
    # Grouped-query attention: query [D, 4, H] and kv [D, 2, 2, H], both split over "model".
    "decoder_only_gqa": (
        DecoderOnlyLM,
        dict(num_kv_heads=2, positions="rotary", attention_out_bias=False),
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_gets_the_layout_of_the_table(name):
    cls, overrides = MODELS[name]
    model = cls(preset("tiny", **overrides))
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    specs = leaf_specs(params, AbstractMesh((4, 2), ("data", "model")))
    assert len(specs) > 10
    for path, spec in specs.items():
        assert spec == expected_spec(path), path
    assert sum(spec != P() for spec in specs.values()) >= 6
    # With model=1 nothing is split: the same table, all replicated.
    assert set(leaf_specs(params, AbstractMesh((8, 1), ("data", "model"))).values()) == {P()}


def test_adam_moments_follow_their_parameters_and_counters_are_replicated():
    model = Transformer(preset("tiny"))
    state = jax.eval_shape(
        lambda: create_train_state(model, jax.random.key(0), TrainConfig(clip_norm=1.0))
    )
    specs = leaf_specs(state, AbstractMesh((4, 2), ("data", "model")))
    moments = 0
    for path, spec in specs.items():
        if "/mu/" in path or "/nu/" in path or path.startswith("params/"):
            param_path = path.split("/mu/")[-1].split("/nu/")[-1].removeprefix("params/")
            assert spec == expected_spec(param_path), path
            moments += "/mu/" in path
        else:  # step, rng, Adam's count, the schedule's count
            assert spec == P(), path
    assert moments == len(jax.tree.leaves(state.params))


def test_uneven_dimensions_are_replicated_or_rejected():
    model = Transformer(preset("tiny"))  # N = 4 heads, F = 64
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    mesh = AbstractMesh((1, 8), ("data", "model"))
    specs = leaf_specs(params, mesh)
    assert specs["encoder/layer_0/self_attention/qkv/kernel"] == P()  # 4 heads on 8: replicated
    assert specs["encoder/layer_0/self_attention/out/kernel"] == P()
    assert specs["encoder/layer_0/ffn/inner/kernel"] == P(None, "model")  # 64 on 8: split
    with pytest.raises(ValueError, match=r"qkv/kernel.*'heads' dimension \(4\).*'model'"):
        shd.partition_spec("layer/self_attention/qkv/kernel", (32, 3, 4, 8), mesh, strict=True)


def test_key_value_heads_that_the_model_axis_does_not_divide_are_replicated_or_rejected():
    model = DecoderOnlyLM(preset("tiny", num_kv_heads=1))  # multi-query: N = 4, K = 1
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    mesh = AbstractMesh((1, 2), ("data", "model"))
    specs = leaf_specs(params, mesh)
    attention = "decoder/layer_0/self_attention"
    assert specs[f"{attention}/query/kernel"] == P(None, "model")  # 4 query heads on 2: split
    assert specs[f"{attention}/kv/kernel"] == P()  # 1 key/value head on 2: replicated
    with pytest.raises(ValueError, match=r"kv/(kernel|bias).*'heads' dimension \(1\).*'model'"):
        shd.param_specs(params, mesh, strict=True)


def test_a_rule_of_the_wrong_rank_and_an_unknown_mesh_axis_are_errors():
    mesh = AbstractMesh((2, 2), ("data", "model"))
    with pytest.raises(ValueError, match=r"'a/qkv/kernel' has 2 dimension\(s\)"):
        shd.partition_spec("a/qkv/kernel", (32, 96), mesh)
    with pytest.raises(ValueError, match="mesh axis 'tensor'"):
        shd.partition_spec("ffn/inner/kernel", (32, 64), mesh, rules=(("mlp", "tensor"),))
    assert shd.partition_spec("some/other/kernel", (32, 64), mesh) == P()


def test_make_mesh_checks_its_arguments_against_the_devices():
    mesh = shd.make_mesh(1)
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    assert dict(shd.make_mesh(-1).shape) == {"data": jax.device_count(), "model": 1}
    with pytest.raises(ValueError, match=r"data \* model = 2 \* 1 = 2 must divide"):
        shd.make_mesh(2)
    with pytest.raises(ValueError, match="data must be an int >= 1 or -1"):
        shd.make_mesh(0)
    with pytest.raises(ValueError, match="model must be an int >= 1"):
        shd.make_mesh(1, model=0)


def smoke(*assignments):
    return override(
        load_config(EXPERIMENTS / "configs" / "num2words.py", "smoke"), list(assignments)
    )


def test_a_mesh_that_does_not_fit_the_devices_fails_fit_at_once_naming_the_keys(tmp_path):
    assert dict(make_run_mesh(smoke("run.mesh_data=-1")).shape) == {"data": 1, "model": 1}
    with pytest.raises(
        ValueError,
        match=r"run.mesh_data=1, run.mesh_model=3 do not fit the 1 device\(s\): .*"
        r"data \* model = 1 \* 3 = 3 must divide",
    ):
        fit(smoke("run.mesh_model=3"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any data or workdir
    with pytest.raises(
        ValueError, match=r"run.mesh_data must be >= 1 or -1 \(all devices\), got 0"
    ):
        smoke("run.mesh_data=0")


def test_initialize_distributed_reads_and_checks_the_environment(monkeypatch):
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert shd.initialize_distributed() == (0, 1)  # one process: nothing to join
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer, got 'first'"):
        shd.initialize_distributed()
    with pytest.raises(ValueError, match=r"process_id \(JAX_PROCESS_ID\) must be in \[0, 2\)"):
        shd.initialize_distributed(num_processes=2, process_id=2)
    with pytest.raises(ValueError, match=r"num_processes \(JAX_NUM_PROCESSES\) must be >= 1"):
        shd.initialize_distributed(num_processes=0)
