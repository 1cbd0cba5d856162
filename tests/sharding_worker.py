"""The 8-device half of ``test_sharding.py``, run in a subprocess (the device count is fixed at import).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharding_worker.py OUT

Runs the same computations on one device and on a ("data" 4, "model" 2) mesh and writes, under OUT,
``arrays.npz`` (losses, final parameters, decoding results of both) and ``info.json`` (shard shapes,
partition specs, error messages). It asserts nothing itself: the test compares the two runs.

Then ``jaxformer.training.fit.fit`` on the smoke config, with the mesh from the config: OUT/fit_mixed
trains steps 1-2 with ``run.mesh_data=1, run.mesh_model=1`` (one device) and resumes, from that
checkpoint, steps 3-4 with ``run.mesh_data=4, run.mesh_model=2``; OUT/fit_one_device trains steps
1-4 on one device. Both workdirs stay for the test, which loads their checkpoints on one device.
"""

import json
import pathlib
import sys
import warnings

from jaxtyping import install_import_hook

with install_import_hook("jaxformer", "beartype.beartype"):  # as the suite checks annotations
    import jax
    import numpy as np

    import jaxformer
    from jaxformer import decoding as dec
    from jaxformer.training import checkpoint, experiment, runs, sharding
    from jaxformer.training import fit as trainer
    from jaxformer.training.metrics import read_jsonl, series
    from jaxformer.training.step import TrainConfig, create_train_state, make_train_step

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
warnings.simplefilter("error")

STEPS = 3
DATA, MODEL = 4, 2
NUM2WORDS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs" / "num2words.py"
# data.max_length=16 keeps one length bucket (one compiled train and eval step per mesh); a checkpoint
# at step 2 is where the mesh changes; adam_epsilon=1e-3 for comparable parameters (see below).
FIT_SETTINGS = (
    "data.max_length=16",
    "optim.adam_epsilon=1e-3",
    "run.log_every=1",
    "run.checkpoint_every=2",
    "run.eval_every=100",
    "run.plot=False",
)


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(kp, simple=True, separator="/"): np.asarray(x)
            for kp, x in leaves}  # fmt: skip


def shards(x) -> dict:
    """What one array looks like on the mesh: its spec, per-device shard shapes, device count."""
    return {
        "spec": [None if a is None else str(a) for a in x.sharding.spec],
        "global": list(x.shape),
        "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
        "devices": len({s.device for s in x.addressable_shards}),
    }


def translation_batch(rng, batch=8, src_len=6, tgt_len=7):
    def ids(length):
        x = rng.integers(3, 32, size=(batch, length)).astype(np.int32)
        for row, keep in enumerate(rng.integers(2, length + 1, size=batch)):
            x[row, keep:] = 0  # padding at the tail, different per row
        return x

    return {"src": ids(src_len), "tgt_in": ids(tgt_len), "tgt_out": ids(tgt_len)}


def train(model, config, mesh, batches):
    state = create_train_state(model, jax.random.key(0), config)
    if mesh is None:
        step = make_train_step(model, config)
    else:
        state = sharding.shard_params(state, mesh)
        step = sharding.make_sharded_train_step(model, config, mesh, state)
    losses, norms, placed = [], [], None
    for batch in batches:
        if mesh is not None:
            batch = sharding.shard_batch(batch, mesh)
            placed = placed or batch
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return state, np.array(losses), np.array(norms), placed


def decode(model, params, src, **kwargs):
    out = {}
    for name, strategy in (("greedy", dec.GreedySearch()), ("beam", dec.BeamSearch(3, 0.6))):
        result = jaxformer.generate(
            model, params, src, start_id=1, end_id=2, max_length=10, strategy=strategy, **kwargs
        )
        for field in ("ids", "lengths", "log_probs", "scores"):
            out[f"{name}/{field}"] = np.asarray(getattr(result, field))
        out[f"{name}/ids_sharding"] = result.ids.sharding
    return out


def main(out_dir: pathlib.Path):
    info: dict = {"device_count": jax.device_count()}
    mesh = sharding.make_mesh(DATA, MODEL)
    info["mesh"] = dict(mesh.shape)
    rng = np.random.default_rng(0)
    # One layer each side keeps the compilations short; dropout 0.1 stays on: masks must agree too.
    model = jaxformer.Transformer(
        jaxformer.preset("tiny", num_encoder_layers=1, num_decoder_layers=1)
    )
    # adam_epsilon 1e-3, not 1e-7: Adam's g / (sqrt(v) + eps) turns float rounding noise on
    # gradients that are zero in exact arithmetic (key biases: softmax ignores a shift) into
    # updates of +-lr; a larger eps keeps the update a smooth function of the gradient.
    config = TrainConfig(warmup_steps=4, clip_norm=1.0, adam_epsilon=1e-3)
    batches = [translation_batch(rng) for _ in range(STEPS)]

    # (a) training: one device vs the 4 x 2 mesh, same keys and batches.
    single, single_losses, single_norms, _ = train(model, config, None, batches)
    sharded, sharded_losses, sharded_norms, placed = train(model, config, mesh, batches)
    arrays = {
        "single/losses": single_losses,
        "sharded/losses": sharded_losses,
        "single/grad_norms": single_norms,
        "sharded/grad_norms": sharded_norms,
        **flat(single.params, "single/params/"),
        **flat(sharded.params, "sharded/params/"),
    }

    # (c) what lives where after the steps: params, Adam moments, the batch, scalars.
    adam = sharded.opt_state[1][0]  # chain(clip, adam) -> (EmptyState, (ScaleByAdamState, ...))
    layer = "encoder/layer_0"
    info["state"] = {
        "qkv": shards(sharded.params["encoder"]["layer_0"]["self_attention"]["qkv"]["kernel"]),
        "qkv_mu": shards(adam.mu["encoder"]["layer_0"]["self_attention"]["qkv"]["kernel"]),
        "qkv_nu": shards(adam.nu["encoder"]["layer_0"]["self_attention"]["qkv"]["kernel"]),
        "out": shards(sharded.params["encoder"]["layer_0"]["self_attention"]["out"]["kernel"]),
        "kv": shards(sharded.params["decoder"]["layer_0"]["memory_attention"]["kv"]["kernel"]),
        "query": shards(
            sharded.params["decoder"]["layer_0"]["memory_attention"]["query"]["kernel"]
        ),
        "inner": shards(sharded.params["encoder"]["layer_0"]["ffn"]["inner"]["kernel"]),
        "inner_bias": shards(sharded.params["encoder"]["layer_0"]["ffn"]["inner"]["bias"]),
        "outer": shards(sharded.params["encoder"]["layer_0"]["ffn"]["outer"]["kernel"]),
        "outer_mu": shards(adam.mu["encoder"]["layer_0"]["ffn"]["outer"]["kernel"]),
        "embedding": shards(sharded.params["source_embedding"]["embedding"]),
        "output": shards(sharded.params["output"]["kernel"]),
        "norm": shards(sharded.params["encoder"]["layer_0"]["norm_ffn"]["scale"]),
        "step": shards(sharded.step),
        "adam_count": shards(adam.count),
    }
    info["layer"] = layer
    info["batch"] = {name: shards(x) for name, x in placed.items()}

    # (b) decoding: the trained single-device params, a padded source batch of 8.
    params = jax.tree.map(np.asarray, single.params)
    src = translation_batch(rng, src_len=9)["src"]
    reference = decode(model, params, src)
    distributed = decode(
        model, sharding.shard_params(params, mesh), sharding.shard_batch(src, mesh)
    )
    for name in ("greedy", "beam"):
        info[f"{name}_ids_spec"] = str(distributed.pop(f"{name}/ids_sharding").spec)
        reference.pop(f"{name}/ids_sharding")
    arrays.update({f"single/{k}": v for k, v in reference.items()})
    arrays.update({f"sharded/{k}": v for k, v in distributed.items()})

    # Errors that need more than one device.
    errors = {}
    for name, call in (
        ("mesh_3", lambda: sharding.make_mesh(3)),
        ("batch_6", lambda: sharding.shard_batch(src[:6], mesh)),
        (
            "strict_8",
            lambda: sharding.param_shardings(params, sharding.make_mesh(1, 8), strict=True),
        ),
    ):
        try:
            call()
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    info["errors"] = errors
    lenient = sharding.param_shardings(params, sharding.make_mesh(1, 8))
    info["heads_on_8"] = str(lenient["encoder"]["layer_0"]["self_attention"]["qkv"]["kernel"].spec)
    info["mlp_on_8"] = str(lenient["encoder"]["layer_0"]["ffn"]["inner"]["kernel"].spec)

    fit_arrays, info["fit"] = fit_on_the_mesh_of_the_config(out_dir)
    arrays.update(fit_arrays)
    loaded_arrays, info["loaded"] = load_on_the_mesh(mesh)
    arrays.update(loaded_arrays)

    np.savez(out_dir / "arrays.npz", **arrays)
    (out_dir / "info.json").write_text(json.dumps(info, indent=1))


def fit_on_the_mesh_of_the_config(out_dir: pathlib.Path) -> tuple[dict, dict]:
    """Steps 1-2 on one device then 3-4 on the 4 x 2 mesh, vs 1-4 on one device (``fit``)."""

    def smoke(*assignments):
        config = experiment.load_config(NUM2WORDS, "smoke")
        return experiment.override(config, [*FIT_SETTINGS, *assignments])

    mixed, one_device = out_dir / "fit_mixed", out_dir / "fit_one_device"
    trainer.fit(smoke("run.train_steps=4"), one_device)
    trainer.fit(smoke("run.train_steps=2"), mixed)  # compiled above: nearly free
    mesh_config = smoke("run.train_steps=4", "run.mesh_data=4", "run.mesh_model=2")
    trainer.fit(mesh_config, mixed)

    arrays = {}
    for name, workdir in (("one_device", one_device), ("mixed", mixed)):
        records = read_jsonl(workdir / "metrics.jsonl")
        for metric in ("train/loss", "train/grad_norm", "valid/loss", "valid/bleu"):
            steps, values = series(records, metric)
            arrays[f"fit/{name}/{metric}"] = np.array(values)
            arrays[f"fit/{name}/{metric}/steps"] = np.array(steps)

    # How the checkpoints were stored: step 2 from one device, step 4 from the mesh.
    with runs.quiet_absl():  # orbax warns that a read-only manager will not save
        manager = checkpoint.make_manager(mixed / "checkpoints", best_metric=None, read_only=True)
    stored = {}
    for step in manager.all_steps():
        params = manager.item_metadata(step).tree["params"]
        qkv = params["encoder"]["layer_0"]["self_attention"]["qkv"]["kernel"].sharding
        stored[str(step)] = {
            "type": type(qkv).__name__,
            "mesh": [int(n) for n in getattr(qkv, "shape", [])],
            "spec": [None if a is None else str(a) for a in getattr(qkv, "partition_spec", [])],
        }
    manager.close()
    # The step fit ran on the mesh: compiled once per batch shape (one here).
    config = experiment.load_json(mixed / "config.json")
    mesh = trainer.make_run_mesh(mesh_config)
    step_fn = trainer._sharded_train_step(runs.build_model(config), config.optim, mesh)
    # Held-out batches: split over "data" when the rows divide evenly, else replicated.
    placed = {
        rows: trainer.place_batch({"src": np.zeros((rows, 5), np.int32)}, mesh)["src"]
        for rows in (6, 8)
    }
    info = {
        "placed": {str(rows): shards(x) for rows, x in placed.items()},
        "workdirs": {"mixed": str(mixed), "one_device": str(one_device)},
        "stored": stored,
        "sharded_step_compilations": step_fn._cache_size(),
    }
    return arrays, info


def load_on_the_mesh(mesh) -> tuple[dict, dict]:
    """A Llama checkpoint (GQA: 4 heads, 2 key/value heads) loaded straight onto the mesh, against
    the same checkpoint loaded on one device: parameters' placement, logits, greedy ids."""
    directory = pathlib.Path(__file__).parent / "data" / "hf_lm" / "llama"
    prompts = [p["ids"] for p in json.loads((directory / "goldens.json").read_text())["prompts"]]
    arrays, placed = {}, {}
    for name, where in (("one_device", None), ("mesh", mesh)):
        pre = jaxformer.load_pretrained(directory, mesh=where)
        width = max(map(len, prompts))
        ids = np.full((len(prompts), width), pre.pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        inputs = jax.numpy.asarray(ids) if where is None else sharding.shard_batch(ids, mesh)
        arrays[f"loaded/{name}/logits"] = np.asarray(
            pre.model.apply({"params": pre.params}, inputs)
        )
        result = jaxformer.generate(
            pre.model, pre.params, prompts, end_id=pre.end_id, max_length=12
        )
        arrays[f"loaded/{name}/greedy"] = np.asarray(result.ids)
        if where is not None:
            layer = pre.params["decoder"]["layer_0"]
            placed = {
                "query": shards(layer["self_attention"]["query"]["kernel"]),
                "kv": shards(layer["self_attention"]["kv"]["kernel"]),
                "out": shards(layer["self_attention"]["out"]["kernel"]),
                "inner": shards(layer["ffn"]["inner"]["kernel"]),
                "embedding": shards(pre.params["embedding"]["embedding"]),
            }
    return arrays, placed


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
