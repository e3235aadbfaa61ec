"""The command line: help with units, option parsing, clear errors (in-process, no training)."""

from __future__ import annotations

import pytest

from gradshield.cli import _make_recipe, build_parser, main, parse_options
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


def test_quickstart_trains_the_default_cpu_model_with_its_recipe():
    """The quickstart's model is speedrun with its preset and flip TTA; the train command's
    defaults are unchanged; the preset is the recipe of experiments/training-cifar10.toml."""
    from pathlib import Path

    from gradshield.cli import train_config
    from gradshield.compat import tomllib
    from gradshield.training import PRESETS

    args = build_parser().parse_args(["quickstart"])
    assert (args.model, args.preset, args.tta) == ("speedrun", "speedrun", "flip")
    config = train_config(args)
    assert config.lookahead and config.flip == "alternating" and config.epochs == args.epochs
    assert build_parser().parse_args(["train"]).model == "compact"
    assert _make_recipe(args).label_smoothing == 0.2  # the preset's, not a second spelling
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    grid = {g["id"]: g for g in tomllib.loads(
        (experiments / "training-cifar10.toml").read_text())["grid"]}
    recipe = grid["speedrun"]["train"]
    assert recipe["preset"] == "speedrun" and recipe["tta"] == "flip"
    assert not set(recipe) & (set(PRESETS["speedrun"]) | {"options"})  # nothing re-spelt
    vanilla = tomllib.loads((experiments / "gcm-cifar10.toml").read_text())["models"]["vanilla"]
    assert vanilla["train"] == {"model": "speedrun", "preset": "speedrun"}


@pytest.mark.parametrize("argv, defense, options", [
    (["--preset", "speedrun"], "standard", {"label_smoothing": 0.2}),
    (["--preset", "speedrun", "--defense-option", "label_smoothing=0.1"], "standard",
     {"label_smoothing": 0.1}),  # the user's option wins
    (["--preset", "speedrun", "--defense", "at"], "at", {}),  # not the AT recipe's option
    (["--preset", "fgr-paper"], "standard", {}),
    ([], "standard", {}),
])
def test_a_preset_sets_its_recipe_options_and_the_users_win(argv, defense, options):
    from dataclasses import asdict

    from gradshield.defenses.recipes import make_recipe

    recipe = _make_recipe(build_parser().parse_args(["train", *argv]))
    assert asdict(recipe) == asdict(make_recipe(defense, **options))


def test_every_preset_option_is_an_option_of_its_recipe_and_is_described():
    from gradshield.defenses.recipes import make_recipe
    from gradshield.training import PRESET_OPTIONS, PRESETS, describe_preset

    assert set(PRESET_OPTIONS) <= set(PRESETS)
    text = describe_preset("speedrun")  # what a report prints for preset = "speedrun"
    assert "label_smoothing=0.2 for the standard recipe" in text and 'flip="alternating"' in text
    assert all(f"{key}=" in text for key in PRESETS["speedrun"])
    for per_defense in PRESET_OPTIONS.values():
        for defense, options in per_defense.items():
            make_recipe(defense, **options)  # raises on an option the recipe lacks


def test_evaluate_help_states_units(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for needle in ("[0, 1] pixel", "in pixels for flow", "--gcm", "resume"):
        assert needle in text


SMALL_SUITE = """
name = "cli-small"
[[attack]]
attack = "fgsm"
eps = "8/255"
[[attack]]
attack = "pgd"
eps = "8/255"
steps = 5
through = "bpda"
"""


def test_evaluate_tta_overrides_the_checkpoint_s_own(tmp_path, _trained_compact, capsys):
    """`evaluate` scores a checkpoint with its own test-time augmentation; `--tta none` takes it
    off and `--tta flip` puts it back, as the same weights with that tta score in-process."""
    import dataclasses
    import json

    from gradshield.checkpoint import save_checkpoint
    from gradshield.data import load_dataset
    from gradshield.metrics import predict
    from tests.conftest import data_dir

    flipped = dataclasses.replace(_trained_compact.config, tta="flip")
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, {"model_config": flipped.to_dict(),
                                 "model_state": _trained_compact.state_dict()})
    test = load_dataset("cifar10", data_dir())[1].subset(300, seed=0).as_float()

    def accuracy(tta: str) -> float:
        model = _trained_compact.__class__(_trained_compact.net, dataclasses.replace(flipped, tta=tta))
        return float((predict(model.eval(), test[0], 300) == test[1]).float().mean())

    results = {}
    for option in ([], ["--tta", "none"], ["--tta", "flip"]):
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(data_dir()),
                     "--test-limit", "300", *option]) == 0
        results[" ".join(option)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results[""]["tta"] == results["--tta flip"]["tta"] == "flip"
    assert results["--tta none"]["tta"] == "none"
    # other batch sizes round differently: a near-tie may go the other way
    for option, tta in (("", "flip"), ("--tta flip", "flip"), ("--tta none", "")):
        assert abs(results[option]["clean_accuracy"] - accuracy(tta)) <= 1 / 300, option


def test_evaluate_with_and_without_gcm_then_compare_in_one_report(tmp_path, _trained_compact, capsys):
    """The CLI path end to end: `evaluate --suite` on a checkpoint file, once as is and once with
    `--gcm front`, then `report a.db b.db`: white-box FGSM looks much stronger against GCM
    (masking), BPDA breaks both alike, and the report compares the two runs."""
    import json

    from gradshield.checkpoint import save_checkpoint
    from gradshield.evaluation import summarize
    from tests.conftest import data_dir

    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, {"model_config": _trained_compact.config.to_dict(),
                                 "model_state": _trained_compact.state_dict()})
    (tmp_path / "suite.toml").write_text(SMALL_SUITE)
    common = ["evaluate", "--checkpoint", str(checkpoint), "--suite", str(tmp_path / "suite.toml"),
              "--data-dir", str(data_dir()), "--test-limit", "64", "--progress", "none"]
    assert main([*common, "--db", str(tmp_path / "vanilla.db")]) == 0
    assert main([*common, "--gcm", "front", "--db", str(tmp_path / "gcm.db")]) == 0
    vanilla, gcm = (summarize(tmp_path / f"{name}.db") for name in ("vanilla", "gcm"))
    assert vanilla["clean_accuracy"] == gcm["clean_accuracy"] > 0.4
    rows = {name: {r["id"]: r["robust_accuracy"] for r in run["attacks"]}
            for name, run in (("vanilla", vanilla), ("gcm", gcm))}
    fgsm_id, bpda_id = list(rows["vanilla"])
    assert rows["gcm"][fgsm_id] > rows["vanilla"][fgsm_id] + 0.2  # the masked white-box number
    assert abs(rows["gcm"][bpda_id] - rows["vanilla"][bpda_id]) <= 0.05  # what BPDA reveals
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "vanilla.db"), str(tmp_path / "gcm.db"),
                 "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "vanilla" in markdown and "gcm" in markdown and (out / "report.html").stat().st_size > 0
    json.dumps(vanilla)  # summaries are plain data
