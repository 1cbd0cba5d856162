"""Training: losses, the train step (pure and jitted), ``fit``, checkpoints, metrics, sharding."""
