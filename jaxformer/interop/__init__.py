"""Other frameworks' models in, jaxformer's models out.

``load_pretrained`` (``registry.py``) reads Hugging Face model directories (``huggingface.py``,
``hf_tokenizers.py``) and OpenNMT-tf checkpoints (``opennmt_tf.py``, ``tf_checkpoint.py``) with
numpy and the tokenizer libraries only, and returns a ``Pretrained`` (``pretrained.py``, which
imports no importer). Each family is one small module in ``families/`` saying how its config and
its tensor names map onto jaxformer's, as a table over one shared mechanism (``weights.py``);
``registry.py`` maps ``model_type`` to it. Every file is read through ``files.py`` (a damaged one
is refused in one line that names it).

Exports of trained models to other inference engines:

``to_ctranslate2`` (``jaxformer export ctranslate2`` on the command line) writes a CTranslate2 model
directory. It needs CTranslate2: ``pip install -e '.[ctranslate2]'`` from the jaxformer repository
root (jaxformer is not on PyPI), or ``pip install ctranslate2``. docs/training.md, "Export to CTranslate2",
shows how to translate with the exported model, and why its ``length_penalty`` is not ours (pass
``length_penalty=0`` on both sides for the same best hypotheses).
"""

from jaxformer.interop.ctranslate2 import SPECIAL_TOKENS, ids_vocab, to_ctranslate2
from jaxformer.interop.pretrained import GenerationDefaults, Pretrained
from jaxformer.interop.registry import load_pretrained

__all__ = [
    "SPECIAL_TOKENS",
    "GenerationDefaults",
    "Pretrained",
    "ids_vocab",
    "load_pretrained",
    "to_ctranslate2",
]
