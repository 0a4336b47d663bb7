"""`loraloop <command> --help` prints every command's options, settings' descriptions included."""

from __future__ import annotations

import pytest

from serving import cli

COMMANDS = [["serve"], ["prepare-model"], ["db"], ["tune"], ["adapters"], ["runs"], ["keys"], ["keys", "create"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_prints(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loraloop " + " ".join(command))


def test_a_percent_sign_in_a_setting_s_description_is_printed_as_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["tune", "--help"])
    assert "(1.645: 95 %)" in " ".join(capsys.readouterr().out.split())
