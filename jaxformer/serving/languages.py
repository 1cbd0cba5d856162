"""Language codes for the LibreTranslate API: what ``source`` and ``target`` may name.

LibreTranslate's clients name languages by ISO 639-1 codes (``en``, ``de``; ``zt`` for
traditional Chinese, as LibreTranslate does). A multilingual checkpoint (NLLB, M2M100) has one
token per language: NLLB's are FLORES-200 codes (``eng_Latn``, ``fra_Latn``), M2M100's
``__en__``. ``Languages.of_tokens`` reads them from the vocabulary; a request may name a language by
its ISO 639-1 code (``COMMON`` maps the common ones to FLORES-200) or by the checkpoint's own code.
A model that translates one pair (Marian, T5, OpenNMT-tf, a trained run) takes it from the command
line (``--languages en:de``: ``Languages.pair``) and refuses every other pair.
"""

from __future__ import annotations

import dataclasses
import re

# ISO 639-1 (LibreTranslate's codes) -> (FLORES-200 code, English name).
COMMON = {
    "af": ("afr_Latn", "Afrikaans"),
    "ar": ("arb_Arab", "Arabic"),
    "az": ("azj_Latn", "Azerbaijani"),
    "be": ("bel_Cyrl", "Belarusian"),
    "bg": ("bul_Cyrl", "Bulgarian"),
    "bn": ("ben_Beng", "Bengali"),
    "ca": ("cat_Latn", "Catalan"),
    "cs": ("ces_Latn", "Czech"),
    "cy": ("cym_Latn", "Welsh"),
    "da": ("dan_Latn", "Danish"),
    "de": ("deu_Latn", "German"),
    "el": ("ell_Grek", "Greek"),
    "en": ("eng_Latn", "English"),
    "eo": ("epo_Latn", "Esperanto"),
    "es": ("spa_Latn", "Spanish"),
    "et": ("est_Latn", "Estonian"),
    "eu": ("eus_Latn", "Basque"),
    "fa": ("pes_Arab", "Persian"),
    "fi": ("fin_Latn", "Finnish"),
    "fr": ("fra_Latn", "French"),
    "ga": ("gle_Latn", "Irish"),
    "gl": ("glg_Latn", "Galician"),
    "gu": ("guj_Gujr", "Gujarati"),
    "he": ("heb_Hebr", "Hebrew"),
    "hi": ("hin_Deva", "Hindi"),
    "hr": ("hrv_Latn", "Croatian"),
    "hu": ("hun_Latn", "Hungarian"),
    "hy": ("hye_Armn", "Armenian"),
    "id": ("ind_Latn", "Indonesian"),
    "is": ("isl_Latn", "Icelandic"),
    "it": ("ita_Latn", "Italian"),
    "ja": ("jpn_Jpan", "Japanese"),
    "ka": ("kat_Geor", "Georgian"),
    "kk": ("kaz_Cyrl", "Kazakh"),
    "ko": ("kor_Hang", "Korean"),
    "ky": ("kir_Cyrl", "Kyrgyz"),
    "lt": ("lit_Latn", "Lithuanian"),
    "lv": ("lvs_Latn", "Latvian"),
    "mk": ("mkd_Cyrl", "Macedonian"),
    "mr": ("mar_Deva", "Marathi"),
    "ms": ("zsm_Latn", "Malay"),
    "mt": ("mlt_Latn", "Maltese"),
    "nb": ("nob_Latn", "Norwegian"),
    "ne": ("npi_Deva", "Nepali"),
    "nl": ("nld_Latn", "Dutch"),
    "pa": ("pan_Guru", "Punjabi"),
    "pl": ("pol_Latn", "Polish"),
    "pt": ("por_Latn", "Portuguese"),
    "ro": ("ron_Latn", "Romanian"),
    "ru": ("rus_Cyrl", "Russian"),
    "sk": ("slk_Latn", "Slovak"),
    "sl": ("slv_Latn", "Slovenian"),
    "sq": ("als_Latn", "Albanian"),
    "sr": ("srp_Cyrl", "Serbian"),
    "sv": ("swe_Latn", "Swedish"),
    "sw": ("swh_Latn", "Swahili"),
    "ta": ("tam_Taml", "Tamil"),
    "te": ("tel_Telu", "Telugu"),
    "th": ("tha_Thai", "Thai"),
    "tl": ("tgl_Latn", "Tagalog"),
    "tr": ("tur_Latn", "Turkish"),
    "uk": ("ukr_Cyrl", "Ukrainian"),
    "ur": ("urd_Arab", "Urdu"),
    "uz": ("uzn_Latn", "Uzbek"),
    "vi": ("vie_Latn", "Vietnamese"),
    "zh": ("zho_Hans", "Chinese"),
    "zt": ("zho_Hant", "Chinese (traditional)"),
}
FLORES = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")  # NLLB's language tokens
M2M100 = re.compile(r"^__([a-z]{2,3})__$")  # M2M100's


class LanguageError(ValueError):
    """A ``source`` or ``target`` the model cannot take; ``field`` names which."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Languages:
    """The languages a translation model serves: by code as a request names it, its token (a
    multilingual model's; None for a single pair) and name."""

    codes: dict[str, str | None]  # the code /languages shows -> the language's token
    names: dict[str, str]
    pair: tuple[str, str] | None = None  # a single-pair model's (source, target)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # other code -> shown code

    @classmethod
    def of_pair(cls, source: str, target: str) -> Languages:
        names = {c: COMMON[c][1] if c in COMMON else c for c in (source, target)}
        return cls({source: None, target: None}, names, (source, target))

    @classmethod
    def of_tokens(cls, vocabulary) -> Languages | None:
        """The language tokens of a multilingual vocabulary (token strings), or None if it has
        none: shown by their ISO 639-1 code where ``COMMON`` has one, else by their own code."""
        flores = {token for token in vocabulary if FLORES.match(token)}
        m2m = {M2M100.match(t).group(1): t for t in vocabulary if M2M100.match(t)}
        if not flores and not m2m:
            return None
        codes, names, aliases = {}, {}, {}
        by_flores = {flores_code: iso for iso, (flores_code, _) in COMMON.items()}
        for token in sorted(flores):
            iso = by_flores.get(token)
            code = iso or token
            codes[code] = token
            names[code] = COMMON[iso][1] if iso else token
            if iso:
                aliases[token] = iso
        for code, token in sorted(m2m.items()):
            codes.setdefault(code, token)
            names.setdefault(code, COMMON[code][1] if code in COMMON else code)
            aliases[token] = code
        return cls(codes, names, None, aliases)

    def resolve(self, field: str, code) -> str:
        """The code ``/languages`` shows for ``code`` (an ISO 639-1 code or the checkpoint's own);
        a ``LanguageError`` naming ``field`` if the model has no such language."""
        if not isinstance(code, str) or not code:
            raise LanguageError(field, f"a language code is required, e.g. 'en', got {code!r}")
        if code in self.codes:
            return code
        if code in self.aliases:
            return self.aliases[code]
        shown = ", ".join(list(self.codes)[:8]) + (", ..." if len(self.codes) > 8 else "")
        raise LanguageError(
            field, f"unknown language {code!r}; this model has {shown} (GET /languages lists them)"
        )

    def check_pair(self, source: str, target: str) -> None:
        if self.pair is not None and (source, target) != self.pair:
            field = "source" if source != self.pair[0] else "target"
            raise LanguageError(
                field,
                f"this model translates {self.pair[0]} to {self.pair[1]} only (jaxformer serve "
                "--languages)",
            )
        if source == target:
            raise LanguageError("target", f"the same language as source ({source!r})")

    def listing(self) -> list[dict]:
        """``GET /languages``: ``[{"code", "name", "targets"}]``."""
        if self.pair is not None:
            source, target = self.pair
            return [
                {"code": source, "name": self.names[source], "targets": [target]},
                {"code": target, "name": self.names[target], "targets": []},
            ]
        every = list(self.codes)
        return [
            {"code": c, "name": self.names[c], "targets": [t for t in every if t != c]}
            for c in every
        ]


def parse_pair(text: str) -> tuple[str, str]:
    """``--languages en:de`` -> ``("en", "de")``."""
    source, colon, target = text.partition(":")
    if not colon or not source or not target or source == target:
        raise ValueError(f"--languages must be SOURCE:TARGET, e.g. en:de, got {text!r}")
    return source, target
