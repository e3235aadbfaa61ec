"""The command line: help with units, option parsing, clear errors (in-process, no training)."""

from __future__ import annotations

import pytest

from gradshield.cli import build_parser, main, parse_options
from gradshield.errors import GradshieldError


def test_help_explains_options_with_units(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("--data-dir", "--train-limit", "learning rate", "pixel", "--defense"):
        assert needle in text


def test_parse_options_types_and_errors():
    fields = {"lam": float, "steps": int, "unit": str, "random_start": bool,
              "step_size": float | None}
    assert parse_options(["lam=0.5", "steps=7", "unit=pixels", "random_start=true",
                          "step_size=none"], fields) == {
        "lam": 0.5, "steps": 7, "unit": "pixels", "random_start": True, "step_size": None}
    with pytest.raises(GradshieldError, match="KEY one of"):
        parse_options(["lamb=1"], fields)
    with pytest.raises(GradshieldError, match="needs a int"):
        parse_options(["steps=1.5"], fields)


def test_errors_exit_with_code_2_and_a_message(capsys, tmp_path):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", "--defense", "nonsense"]) == 2
    assert "unknown defense" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(tmp_path), "--dataset", "cifar10-jpeg"]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_lists(capsys):
    assert main(["models"]) == 0 and "compact" in capsys.readouterr().out
    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    assert "standard" in out and "options" in out
    assert build_parser().parse_args(["quickstart"]).epochs > 0
