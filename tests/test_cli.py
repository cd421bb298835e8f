"""The r4b command line."""

from __future__ import annotations

import pytest

from r4b import cli


def test_info_lists_every_op(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("group_advantages", "pack", "varlen_attention"):
        assert op in out
    assert "r4b._C: cpu ops" in out


def test_unknown_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["info", "--bogus"])
