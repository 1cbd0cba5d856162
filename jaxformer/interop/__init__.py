"""Exports of trained models to other inference engines.

``to_ctranslate2`` (``jaxformer export ctranslate2`` on the command line) writes a CTranslate2 model
directory. It needs CTranslate2: ``pip install -e '.[ctranslate2]'`` from the jaxformer repository
root (jaxformer is not on PyPI), or ``pip install ctranslate2``. README.md, "Export to CTranslate2",
shows how to translate with the exported model, and why its ``length_penalty`` is not ours (pass
``length_penalty=0`` on both sides for the same best hypotheses).
"""

from jaxformer.interop.ctranslate2 import SPECIAL_TOKENS, ids_vocab, to_ctranslate2

__all__ = ["SPECIAL_TOKENS", "ids_vocab", "to_ctranslate2"]
