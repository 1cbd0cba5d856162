"""The small trained run the CLI tests share: trained once per process, whichever module asks first.

Modules that use it mark themselves ``pytest.mark.xdist_group("cli_trained_run")`` so that xdist
(``--dist loadgroup``) keeps them on one worker and the run is trained once.
"""

from jaxformer.cli import main

from helpers import EXPERIMENTS

NUM2WORDS = str(EXPERIMENTS / "configs" / "num2words.py")
_RUNS = {}


def trained_run(tmp_path_factory):
    """A workdir holding the num2words ``smoke`` run (model max_len 128, decode_max_length 40)."""
    if "smoke" not in _RUNS:
        path = tmp_path_factory.mktemp("cli") / "run"
        assert main(["train", "--config", f"{NUM2WORDS}:smoke", "--workdir", str(path)]) == 0
        _RUNS["smoke"] = path
    return _RUNS["smoke"]


SHAKESPEARE = str(EXPERIMENTS / "configs" / "shakespeare.py")


def trained_lm(tmp_path_factory):
    """A workdir holding the char-level LM ``smoke`` run, trained on a tiny repeated text."""
    if "lm" not in _RUNS:
        root = tmp_path_factory.mktemp("cli-lm")
        text = root / "text.txt"
        text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
        argv = ["train", "--config", f"{SHAKESPEARE}:smoke", "--workdir", str(root / "lm")]
        assert main([*argv, "--set", f"data.text_file={text}"]) == 0
        _RUNS["lm"] = root / "lm"
    return _RUNS["lm"]
