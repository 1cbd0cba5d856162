"""The dimension legend and the array aliases used in annotations across jaxformer.

Dimension legend (jaxtyping strings, einsum letters and shape comments all use it):

    B  batch                  W  beam width            T  target / query length
    S  source / key length    D  model width           N  heads
    H  head width             F  feed-forward width    V  vocabulary
    L  layers                 K  shortening factor     R  rows of a search (B*W)

In attention code (where no shortening factor appears) ``K`` is the number of key/value heads
(grouped-query attention: K divides N) and ``G = N / K`` the query heads that share one.

Annotations are checked only in the test suite (``--jaxtyping-packages=jaxformer,...``), so they cost
nothing at run time.
"""

from typing import Any, TypeAlias

import jax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

PyTree: TypeAlias = Any
PRNGKey: TypeAlias = PRNGKeyArray | jax.Array

__all__ = ["Array", "Bool", "Float", "Int", "PRNGKey", "PyTree"]
