"""The models: configs and options, layers, attention, KV caches, the encoder-decoder Transformer, the
decoder-only LM and the Hourglass LM. Nothing here knows about search."""
