"""Ctrl-C outside the training loop (loading a run, preparing data, translating): one line, 130."""

from jaxformer import cli
from jaxformer.cli import decode


def test_an_interrupt_anywhere_in_a_command_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(decode, "cmd_translate", interrupted)
    assert cli.main(["translate", "--workdir", "anywhere"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "jaxformer: interrupted" and "Traceback" not in err
