"""Strict test settings: rank promotion raises, float32 everywhere, deterministic CPU, fast compiles.

One persistent compilation cache per test run, shared by the xdist workers and the subprocesses the
tests start (through the environment): many tests build the same small models in new closures, and
XLA's output for an identical program is reused instead of compiled again. The cache starts empty
for every run (its directory is named after the run) and is removed when the run ends, so no result
depends on an earlier run.
"""

import gc
import os
import shutil
import tempfile

# The controller (or a run without xdist) makes the directory; workers and subprocesses inherit it.
OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    OWN_CACHE = tempfile.mkdtemp(prefix="jaxformer-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile fast: most of the suite's time is XLA compiling small programs that then run for
# milliseconds. LLVM at -O0 without its expensive passes (15-20% less time for the compile-heavy
# modules and for the training ones, measured on 2 cores), and XLA:CPU's older elemental emitters
# for fusions instead of its MLIR fusion emitters (compiling a small model's searches and gradient:
# 8.3 -> 4.5 s; test_target_prefix + test_ragged_prompts + test_search_reference: 150 -> 88 s). The
# HLO passes (fusion decisions and copy insertion included) are unchanged. Speed is measured by
# experiments/, never here.
FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false"
)
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
# In case a plugin imported jax before the environment above was set.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)


@pytest.fixture(scope="session")
def key():
    return jax.random.key(0)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's in-memory compiled programs after each test module.

    Every CPU executable keeps its own memory mappings (about 200 per compiled search); an xdist
    worker that runs half the suite without freeing them passes the kernel's limit of 65,530
    mappings per process (``vm.max_map_count``) and XLA's next compilation segfaults. Programs
    compiled again later come from the persistent compilation cache above.
    """
    yield
    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config):
    if OWN_CACHE is not None:  # the process that made the cache, after every worker is done
        shutil.rmtree(OWN_CACHE, ignore_errors=True)
