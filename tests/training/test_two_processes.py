"""Two real JAX processes on this machine: train, save, SIGKILL, restart, resume, decode.

The fixture starts ``tests/two_processes_worker.py`` twice over, as two processes joined by
``jax.distributed.initialize`` (coordinator on 127.0.0.1, a free port; CPU collectives by gloo), each
with 2 simulated CPU devices, one ("data" 2, "model" 2) mesh across both (process 0 holds data
row 0, process 1 row 1; the model axis stays inside a process):

1. ``first``: steps 1-3, a checkpoint at step 2 (each process writes its own shards), then
   process 1 is SIGKILLed while process 0 is in step 4 (its gradient all-reduce fails: the peer is
   gone) and process 0 is killed too, as a job launcher would.
2. ``resume``: a fresh pair of processes (a new port) restores the latest step (2) onto the mesh,
   verified by the checksums, decodes greedily and with a beam of 3, trains steps 3-4 and saves 4.

This process (one CPU device) then trains the same 4 steps on one device and compares: losses of
every step at rtol 1e-5 (float32 sums in another order, see ``tests/training/test_sharding.py``), the
resumed step 3 equal bit for bit to the killed run's step 3, and the checkpoints the two processes
wrote restore here, on one process and one device, verified: the step-4 parameters match the
one-device run, and decoding with the step-2 parameters gives the same ids (exactly) and scores
(rtol 1e-5) as the two processes did. Measured on 2 CPU cores: 55 s for the two pairs of processes
(JAX start-up and compilation dominate; the suite's compilation cache is shared with them), 85 s for
the module with ``-n 2 --dist loadgroup``.

Every subprocess runs in its own session (process group), killed with SIGKILL in a ``finally``;
the coordinator's port dies with process 0.
"""

import gc
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxformer
from jaxformer.training import checkpoint as ckpt
from jaxformer.training.step import create_train_state, train_step_fn

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).parents[1] / "two_processes_worker.py"
RTOL, PARAM_ATOL = 1e-5, 2e-6
TIMEOUT = 300  # seconds for each phase, start-up and compilation included
FAST_COMPILE = {"xla_backend_optimization_level": 0}

sys.path.insert(0, str(WORKER.parent))
import two_processes_worker as worker  # noqa: E402  (the model, config and data of the workers)

# Two JAX processes of 2 devices each: keep this module on one xdist worker (its session fixture
# runs once) and away from the other process-heavy module's group.
pytestmark = [pytest.mark.xdist_group("two_processes"), pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(phase: str, out: pathlib.Path) -> list[subprocess.Popen]:
    port = free_port()
    flags = os.environ.get("XLA_FLAGS", "")
    processes = []
    for process_id in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": "2",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(process_id),
            "XLA_FLAGS": f"{flags} --xla_backend_optimization_level=0".strip(),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        }
        with (out / f"{phase}.process_{process_id}.log").open("w") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), phase, str(out)],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    start_new_session=True,  # its own process group: killed whole in kill()
                )
            )
    return processes


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def logs(out: pathlib.Path, phase: str) -> str:
    return "\n".join(
        f"--- process {i}:\n" + (out / f"{phase}.process_{i}.log").read_text()[-3000:]
        for i in range(2)
    )


def wait_for(paths: list[pathlib.Path], processes: list[subprocess.Popen], out, phase) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not all(p.exists() for p in paths):
        dead = [p.returncode for p in processes if p.poll() is not None]
        assert not dead, f"a {phase} process exited early ({dead}):\n{logs(out, phase)}"
        assert time.monotonic() < deadline, f"{phase}: timed out:\n{logs(out, phase)}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """``(out, first, resume, arrays, seconds)``: the two phases' outputs (per-process JSON)."""
    out = tmp_path_factory.mktemp("two_processes")
    began = time.monotonic()
    processes: list[subprocess.Popen] = []
    try:
        processes = start_pair("first", out)
        wait_for([out / f"first.process_{i}.json" for i in range(2)], processes, out, "first")
        os.killpg(processes[1].pid, signal.SIGKILL)  # the SIGKILL of one process
        assert processes[1].wait(timeout=30) == -signal.SIGKILL
        try:  # process 0's all-reduce fails without its peer; the launcher kills it anyway
            processes[0].wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        kill(processes[0])

        processes = start_pair("resume", out)
        for process in processes:
            try:
                code = process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"resume: timed out:\n{logs(out, 'resume')}")
            assert code == 0, f"resume: exit code {code}:\n{logs(out, 'resume')}"
    finally:
        for process in processes:
            kill(process)
    seconds = time.monotonic() - began

    def read(phase):
        return [json.loads((out / f"{phase}.process_{i}.json").read_text()) for i in range(2)]

    with np.load(out / "resume.npz") as arrays:
        return out, read("first"), read("resume"), dict(arrays), seconds


@pytest.fixture(scope="session")
def one_process():
    """Steps 1-4 on one device in this process: losses and the state after each step."""
    model = worker.model()
    state = create_train_state(model, jax.random.key(0), worker.CONFIG)
    # The library's pure step, jitted as make_train_step does, with XLA's optimisation level 0 as
    # the workers (half the compile time; the same numbers up to float32 rounding).
    step = jax.jit(train_step_fn(model, worker.CONFIG), compiler_options=FAST_COMPILE)
    losses, states = {}, {}
    for number, batch in enumerate(worker.batches(), start=1):
        state, metrics = step(state, batch)
        losses[number] = float(metrics["loss"])
        states[number] = jax.tree.map(np.asarray, state)
    return model, losses, states


def test_two_processes_share_one_mesh_and_each_writes_its_shards(run):
    out, first, resume, _, seconds = run
    print(f"two processes: {seconds:.0f} s")
    for info in first + resume:
        assert info["processes"] == 2 and info["devices"] == 4 and info["local_devices"] == 2
        assert info["mesh_processes"] == [[0, 0], [1, 1]]  # data row i lives in process i
    for info in first:  # the heads split over "model" inside each process, 2 of 4 shards held
        assert info["qkv"] == {
            "spec": [None, None, "model"],
            "global": [32, 3, 4, 8],
            "local_shards": [[32, 3, 2, 8], [32, 3, 2, 8]],
            "fully_addressable": False,
        }
    assert resume[0]["restored_qkv"] == first[0]["qkv"]  # restored with the layout it was saved in
    assert resume[0]["ids_spec"] == "P('data',)"
    for step in (2, 4):
        arrays = out / "checkpoints" / str(step) / "default"
        assert (arrays / "ocdbt.process_0").is_dir() and (arrays / "ocdbt.process_1").is_dir()


def test_sharded_training_over_two_processes_matches_one_process(run, one_process):
    _, first, _, _, _ = run
    _, losses, _ = one_process
    assert len(set(losses.values())) == 4  # the steps really change the model
    for info in first:
        got = {int(k): v for k, v in info["losses"].items()}
        assert sorted(got) == [1, 2, 3]
        np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [losses[s] for s in (1, 2, 3)],
                                   rtol=RTOL)  # fmt: skip


def test_the_restart_resumes_to_the_uninterrupted_run(run, one_process):
    out, first, resume, _, _ = run
    _, losses, _ = one_process
    for info in resume:
        assert info["restored_step"] == 2  # the last complete save before the SIGKILL
        got = {int(k): v for k, v in info["losses"].items()}
        assert sorted(got) == [3, 4]
        # Step 3 again, on the same mesh from the restored state: bit for bit the killed run's.
        assert got[3] == first[0]["losses"]["3"]
        np.testing.assert_allclose([got[3], got[4]], [losses[3], losses[4]], rtol=RTOL)
    assert resume[0]["checksums"] == resume[1]["checksums"]
    manager = ckpt.make_manager(out / "checkpoints", best_metric=None, read_only=True)
    assert manager.all_steps() == [2, 4]
    manager.close()


def test_a_checkpoint_of_two_processes_restores_on_one(run, one_process):
    out, _, resume, _, _ = run
    model, _, states = one_process
    directory = out / "checkpoints"
    # The parameters, for inference: onto this process's one device, verified.
    params = ckpt.restore_params(directory, jax.eval_shape(lambda: states[4].params))
    for (path, got), want in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(states[4].params),
        strict=True,
    ):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=PARAM_ATOL, err_msg=str(path))
    # The whole train state, onto a one-device layout, verified; the same checksums as on the mesh.
    fresh = create_train_state(model, jax.random.key(0), worker.CONFIG)
    manager = ckpt.make_manager(directory, best_metric=None, read_only=True)
    state = ckpt.restore(manager, ckpt.abstract_state(fresh), step=4)
    manager.close()
    assert int(state.step) == 4
    assert ckpt.checksums(state) == resume[0]["checksums"]


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_sharded_decoding_over_two_processes_matches_one_process(run, one_process, search):
    out, _, _, arrays, _ = run
    model, _, _ = one_process
    params = ckpt.restore_params(
        out / "checkpoints", step=2
    )  # what the resumed processes decoded with
    strategy = dict(worker.SEARCHES)[search]
    result = jaxformer.generate(
        model, params, worker.source(), start_id=1, end_id=2, max_length=10, strategy=strategy
    )
    assert arrays[f"{search}/ids"].shape == (8, 1 if search == "greedy" else 3, 10)
    np.testing.assert_array_equal(arrays[f"{search}/ids"], np.asarray(result.ids))
    np.testing.assert_array_equal(arrays[f"{search}/lengths"], np.asarray(result.lengths))
    for field in ("log_probs", "scores"):
        want = np.asarray(getattr(result, field))
        assert np.all(np.isfinite(want)) and np.all(want < 0)
        np.testing.assert_allclose(arrays[f"{search}/{field}"], want, rtol=RTOL)


# Orbax leaves coroutines behind when tensorstore fails to read (see tests/training/test_faults.py).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_shard_of_a_two_process_checkpoint_is_refused(run, one_process, tmp_path):
    out, _, _, _, _ = run
    model, _, _ = one_process
    directory = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", directory)
    # Bytes written by process 1, flipped at a quarter, half and three quarters of every data file
    # (one spot in the largest file alone could fall outside every array read back: seen once).
    for data in (directory / "4" / "default" / "ocdbt.process_1" / "d").iterdir():
        size = data.stat().st_size
        with data.open("r+b") as f:
            for offset in (size // 4, size // 2, 3 * size // 4):
                f.seek(offset)
                chunk = f.read(16)
                f.seek(offset)
                f.write(bytes(b ^ 0xFF for b in chunk))
    abstract = ckpt.abstract_state(create_train_state(model, jax.random.key(0), worker.CONFIG))
    manager = ckpt.make_manager(directory, best_metric=None, read_only=True)
    with pytest.raises(ValueError, match=r"step 4( is corrupted: \d+ of \d+ arrays|: cannot read)"):
        ckpt.restore(manager, abstract, step=4)
    manager.close()
    gc.collect()  # collects orbax's coroutines here, not in whichever test runs next


# The checksum itself, in this process ------------------------------------------------------------


def test_the_checksum_does_not_depend_on_how_an_array_is_held_or_chunked(monkeypatch):
    rng = np.random.default_rng(1)
    tree = {
        "w": rng.normal(size=(37, 5, 3)).astype(np.float32),
        "i": np.arange(7, dtype=np.int32),
        "s": np.float32(2.5),
        "h": rng.normal(size=(4, 6)).astype(np.float16)[:, ::2],  # not contiguous
    }
    sums = ckpt.checksums(tree)
    assert ckpt.checksums(jax.tree.map(jax.numpy.asarray, tree)) == sums
    monkeypatch.setattr(ckpt, "_CHUNK", 7)  # several chunks per array
    assert ckpt.checksums(tree) == sums
    # Any one element by one ulp, or the same values in other places: another sum.
    for change in (
        lambda t: t["w"].__setitem__((36, 4, 2), np.nextafter(t["w"][36, 4, 2], 9)),
        lambda t: t.__setitem__("i", t["i"][::-1].copy()),
    ):
        other = {k: np.array(v) for k, v in tree.items()}
        change(other)
        assert [k for k in sums if ckpt.checksums(other)[k] != sums[k]] in (["w"], ["i"])


def test_a_checkpoint_with_the_earlier_sha256_checksums_still_restores(tmp_path):
    state = {
        "params": {"w": jax.numpy.arange(64 * 64, dtype=np.float32).reshape(64, 64)},
        "step": jax.numpy.int32(5),
    }
    manager = ckpt.make_manager(tmp_path / "ckpt", best_metric=None)
    manager.save(  # as jaxformer saved before the sharding-independent checksums
        5,
        args=ocp.args.StandardSave(state),
        custom_metadata={ckpt.LEGACY_CHECKSUMS: ckpt.sha256_checksums(state)},
    )
    manager.wait_until_finished()
    chex.assert_trees_all_equal(ckpt.restore(manager, ckpt.abstract_state(state)), state)
    chex.assert_trees_all_equal(ckpt.restore_params(tmp_path / "ckpt"), state["params"])
    manager.close()
    data = max((tmp_path / "ckpt" / "5").rglob("d/*"), key=lambda p: p.stat().st_size)
    with data.open("r+b") as f:
        f.seek(data.stat().st_size // 2)
        chunk = f.read(4)
        f.seek(data.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(ValueError, match=r"is corrupted: 1 of 1 arrays .*SHA-256 mismatch"):
        ckpt.restore_params(tmp_path / "ckpt")
