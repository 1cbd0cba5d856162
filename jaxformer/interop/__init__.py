"""Exports of trained models to other inference engines.

``to_ctranslate2`` needs the optional extra: ``pip install 'jaxformer[ctranslate2]'``.
"""

from jaxformer.interop.ctranslate2 import SPECIAL_TOKENS, ids_vocab, to_ctranslate2

__all__ = ["SPECIAL_TOKENS", "ids_vocab", "to_ctranslate2"]
