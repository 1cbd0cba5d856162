"""The parts of ``jaxformer serve`` below its routes, without a server: text streamed as tokens
arrive (``TextStream``), language codes (``Languages``), a request's search options
(``decode_options``). ``test_serve.py`` drives whole servers."""

import pytest

from jaxformer.decoding.decode_options import DecodeOptions
from jaxformer.serving.languages import LanguageError, Languages
from jaxformer.serving.requests import Limits, RequestError, decode_options
from jaxformer.serving.streams import TextStream


def test_text_stream_holds_back_what_may_change_and_cuts_at_stop_strings():
    pieces = {1: "ab", 2: "c\ufffd", 3: "", 4: "d", 5: "STO", 6: "P", 7: "e"}
    decode = lambda ids: "".join(pieces[i] for i in ids)
    stream = TextStream(decode, ["STOP"])
    assert stream.push([1, 2]) == "abc"  # the replacement character waits for its bytes
    assert stream.push([3, 4, 5]) == "\ufffdd"  # "STO" may begin the stop string
    assert stream.push([6, 7]) == "" and stream.stopped and stream.tokens == [1, 2, 3, 4, 5, 6]
    assert stream.text == stream.sent == "abc\ufffdd" and stream.finish() == ""
    plain = TextStream(decode)
    assert plain.push([1, 5]) == "abSTO" and plain.finish() == "" and not plain.stopped


def test_language_codes():
    languages = Languages.of_tokens(["<s>", "eng_Latn", "fra_Latn", "ace_Arab", "__de__"])
    assert languages.resolve("source", "en") == "en" == languages.resolve("source", "eng_Latn")
    assert languages.codes["en"] == "eng_Latn" and languages.codes["de"] == "__de__"
    with pytest.raises(LanguageError, match="target: unknown language 'xx'"):
        languages.resolve("target", "xx")
    pair = Languages.of_pair("en", "de")
    pair.check_pair("en", "de")
    with pytest.raises(LanguageError, match="target: this model translates en to de only"):
        pair.check_pair("en", "fr")
    assert pair.listing()[0] == {"code": "en", "name": "English", "targets": ["de"]}
    assert Languages.of_tokens(["<s>", "hello"]) is None


def test_request_options_take_the_defaults_that_still_apply():
    limits = Limits((1, 4), 64, 32, 0, True, False)
    defaults = DecodeOptions(beam_size=4, length_penalty=0.6, n_best=3, max_length=50)
    o = decode_options(defaults, {"beam_size": 1}, limits)  # the default penalty and n_best drop
    assert (o.beam_size, o.length_penalty, o.n_best, o.max_length) == (1, 0.0, 1, 50)
    o = decode_options(defaults, {"sampling_topk": "0", "sampling_temperature": "0.5"}, limits)
    assert (o.sampling_topk, o.sampling_temperature) == (0, 0.5)  # form fields are text
    for given, field in [
        ({"beam_size": 1, "length_penalty": 0.2}, "length_penalty"),
        ({"max_length": 65}, "max_length"),
        ({"sampling_topk": 5}, "sampling_topk"),
        ({"coverage_penalty": 0.2}, "coverage_penalty"),
        ({"seed": "x"}, "seed"),
        ({"n_best": 5}, "n_best"),
    ]:
        with pytest.raises(RequestError) as refused:
            decode_options(defaults, given, limits)
        assert refused.value.field == field and refused.value.status == 400
