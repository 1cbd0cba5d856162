"""One module per imported family: how its config and its tensor names map onto jaxformer's.

Each Hugging Face family module has ``MODEL`` (the jaxformer model class), ``config(cfg, max_len)``
(``config.json`` as a ``TransformerConfig``, refusing by name what jaxformer does not compute),
``table(c, tensors)`` (parameter path -> rule, ``weights.py``) and optionally ``IGNORED`` (stored
tensors that are not parameters). ``registry.py`` maps ``model_type`` to the module; a new family
is a new module and one line there.

- ``bart``: BART and mBART, and the tensor names Marian and M2M100 / NLLB share with them;
- ``marian``, ``m2m100``: their configs over BART's names;
- ``t5``: T5, T5 v1.1, mT5 (and MADLAD-400);
- ``gpt2``: GPT-2;
- ``llama``: Llama 1-3.2 and Mistral (a window), and the names Qwen2 and Gemma share;
- ``qwen2``, ``gemma``: their configs over Llama's names;
- ``opennmt_tf``: OpenNMT-tf V2 Transformers (config from the tensors and hints, not a file).
"""
