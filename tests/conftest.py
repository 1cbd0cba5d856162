"""Strict test settings: rank promotion raises, float32 everywhere, deterministic CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def key():
    return jax.random.key(0)
