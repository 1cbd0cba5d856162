"""One of the two processes of ``tests/training/test_two_processes.py``: a ("data" 2, "model" 2) mesh over 2 x 2
simulated CPU devices, collectives across the processes by gloo (JAX's default on CPU).

    JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=2 JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT \\
    JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python tests/two_processes_worker.py PHASE OUT   # and ID 1

PHASE ``first``: trains steps 1-3 (the processes feed their own halves of every batch), saves step 2
into OUT/checkpoints, writes OUT/first.process_I.json (losses, shard layout) after step 3, then
waits to be killed: process 1 sleeps, process 0 starts step 4 (which waits on process 1).

PHASE ``resume`` (a fresh pair of processes): restores the latest step (2) onto the mesh, verified,
decodes the source batch greedily and with a beam of 3 with the restored parameters, trains steps
3-4 and saves step 4. (Without a checkpoint in OUT it starts from step 0: trains steps 1-4.) Process 0 writes OUT/resume.npz (losses, decoding results gathered from both
processes) and every process OUT/resume.process_I.json. It asserts nothing itself: the test compares
with one process. ``batches`` / ``source`` / ``MODEL`` / ``CONFIG`` are shared with the test.
"""

import json
import os
import pathlib
import sys
import threading
import time
import warnings

from jaxtyping import install_import_hook

with install_import_hook("jaxformer", "beartype.beartype"):  # as the suite checks annotations
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import jaxformer
    from jaxformer import decoding as dec
    from jaxformer.training import checkpoint as ckpt
    from jaxformer.training import sharding as shd
    from jaxformer.training.step import TrainConfig, create_train_state

BEGAN = time.monotonic()
DATA, MODEL_AXIS = 2, 2
STEPS = 4
# One layer each side keeps compilation short; dropout stays on (the masks must agree too).
MODEL = dict(num_encoder_layers=1, num_decoder_layers=1)
# adam_epsilon 1e-3: see tests/training/test_sharding.py (rounding noise on gradients that are 0 in exact
# arithmetic would otherwise become updates of +-learning rate on either side).
CONFIG = TrainConfig(warmup_steps=4, clip_norm=1.0, adam_epsilon=1e-3)
SEARCHES = (("greedy", dec.GreedySearch()), ("beam", dec.BeamSearch(3, 0.6)))


def log(what: str) -> None:
    """Progress on stderr (the test keeps it in OUT/PHASE.process_I.log and shows it on failure)."""
    print(f"[{time.monotonic() - BEGAN:6.1f} s] {what}", file=sys.stderr, flush=True)


def model():
    return jaxformer.Transformer(jaxformer.preset("tiny", **MODEL))


def batches(rows: int = 8, src_len: int = 6, tgt_len: int = 7) -> list[dict[str, np.ndarray]]:
    """The global batches of steps 1..STEPS (every process builds all of them)."""
    rng = np.random.default_rng(0)

    def ids(length):
        x = rng.integers(3, 32, size=(rows, length)).astype(np.int32)
        for row, keep in enumerate(rng.integers(2, length + 1, size=rows)):
            x[row, keep:] = 0
        return x

    return [{"src": ids(src_len), "tgt_in": ids(tgt_len), "tgt_out": ids(tgt_len)}
            for _ in range(STEPS)]  # fmt: skip


def source() -> np.ndarray:
    """int32[8, 9]: the padded source batch decoded after the restore."""
    return batches(src_len=9)[0]["src"]


def decode(model, params, src) -> dict[str, np.ndarray]:
    out = {}
    for name, strategy in SEARCHES:
        result = jaxformer.generate(
            model, params, src, start_id=1, end_id=2, max_length=10, strategy=strategy
        )
        for field in ("ids", "lengths", "log_probs", "scores"):
            out[f"{name}/{field}"] = getattr(result, field)
    return out


def own_rows(x: np.ndarray) -> np.ndarray:
    per = len(x) // jax.process_count()
    return x[jax.process_index() * per : (jax.process_index() + 1) * per]


def layout(x: jax.Array) -> dict:
    return {
        "spec": [None if a is None else str(a) for a in x.sharding.spec],
        "global": list(x.shape),
        "local_shards": sorted(tuple(s.data.shape) for s in x.addressable_shards),
        "fully_addressable": x.is_fully_addressable,
    }


def main(phase: str, out: pathlib.Path) -> None:
    log(f"{phase}: imported")
    process, count = shd.initialize_distributed()
    log(f"joined as process {process} of {count}")
    mesh = shd.make_mesh(DATA, MODEL_AXIS)
    net = model()
    state = shd.shard_params(create_train_state(net, jax.random.key(0), CONFIG), mesh)
    train_step = shd.make_sharded_train_step(net, CONFIG, mesh, state)
    manager = ckpt.make_manager(out / "checkpoints", keep=5, best_metric=None)
    info: dict = {
        "process": process,
        "processes": count,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "mesh_processes": [[d.process_index for d in row] for row in mesh.devices.tolist()],
    }
    all_batches = batches()
    losses: dict[int, float] = {}

    def train(first: int, last: int):
        nonlocal state
        for step in range(first, last + 1):
            batch = shd.shard_batch(
                {k: own_rows(v) for k, v in all_batches[step - 1].items()}, mesh
            )
            state, metrics = train_step(state, batch)
            losses[step] = float(metrics["loss"])  # replicated: every process has it
            log(f"step {step}: loss {losses[step]}")

    if phase == "first":
        train(1, 2)
        ckpt.save(manager, 2, state)
        log("saved step 2")
        train(3, 3)
        qkv = state.params["encoder"]["layer_0"]["self_attention"]["qkv"]["kernel"]
        info.update(losses=losses, qkv=layout(qkv), step=int(jax.device_get(state.step)))
        (out / f"first.process_{process}.json").write_text(json.dumps(info))
        if process == 0:
            train(4, 4)  # waits on process 1 in the gradient all-reduce: killed there
        time.sleep(300)  # the test kills the processes long before
        sys.exit(3)

    assert phase == "resume", phase
    if manager.latest_step() is not None:  # else from scratch: the README's example run
        state = ckpt.restore_latest(manager, ckpt.abstract_state(state))
    info["restored_step"] = int(jax.device_get(state.step))
    log(f"restored step {info['restored_step']}")
    qkv = state.params["encoder"]["layer_0"]["self_attention"]["qkv"]["kernel"]
    info["restored_qkv"] = layout(qkv)
    decoded = decode(net, state.params, shd.shard_batch(own_rows(source()), mesh))
    info["ids_spec"] = str(decoded["greedy/ids"].sharding.spec)
    arrays = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in decoded.items()}
    log("decoded")
    train(info["restored_step"] + 1, STEPS)
    ckpt.save(manager, STEPS, state)
    log(f"saved step {STEPS}")
    info["losses"] = losses
    info["checksums"] = ckpt.checksums(state)  # every process computes the same
    manager.close()
    (out / f"resume.process_{process}.json").write_text(json.dumps(info))
    if process == 0:
        np.savez(out / "resume.npz", **arrays)


if __name__ == "__main__":
    # Gone after 10 minutes whatever happens (a killed test, a peer that never came): os._exit skips
    # the atexit handlers, among them jax.distributed's shutdown, which waits for the other process.
    watchdog = threading.Timer(600, os._exit, (4,))
    watchdog.daemon = True
    watchdog.start()
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")
    warnings.simplefilter("error")
    main(sys.argv[1], pathlib.Path(sys.argv[2]))
