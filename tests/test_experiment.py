"""The one results engine: an experiment file run through the runner into SQLite files, its report
rendered from them (again identically), transfer adversarials crafted once, a SIGKILL mid-run
resumed to the same per-example results, and every experiment in experiments/ checked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gradshield.cli import main
from gradshield.errors import GradshieldError
from gradshield.evaluation.crafted import CraftedStore
from gradshield.evaluation.execute import Workspace
from gradshield.evaluation.experiment import load_experiment, parse_experiment
from gradshield.evaluation.store import load_run
from tests.conftest import data_dir

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def _copy_experiment(tmp_path: Path) -> Path:
    for name in ("tiny-experiment.toml", "tiny-suite.toml"):
        shutil.copy(DATA / name, tmp_path / name)
    return tmp_path / "tiny-experiment.toml"


def _results(work: Path) -> dict[str, list[tuple]]:
    out = {}
    for db in sorted((work / "runs").glob("*.db")):
        with sqlite3.connect(db) as conn:
            out[db.name] = conn.execute("SELECT aid, idx, success, size, queries FROM results "
                                        "ORDER BY aid, idx").fetchall()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cifar):
    """The tiny experiment run once to completion (module-scoped: ~20 s)."""
    root = tmp_path_factory.mktemp("experiment")
    path = _copy_experiment(root)
    work, out = root / "work", root / "out"
    code = main(["experiment", str(path), "--work-dir", str(work), "--out", str(out),
                 "--progress", "none", "--data-dir", str(data_dir())])
    assert code == 0
    return path, work, out


def test_experiment_report_holds_every_rate_with_its_interval_and_rerenders_identically(finished):
    path, work, out = finished
    markdown = (out / "tiny.md").read_text()
    assert "## Attacks" in markdown and "| clean (ACC) |" in markdown
    assert "n=24)" in markdown  # rates carry their count...
    assert markdown.count("(") > 20  # ...and interval
    assert "**GCM keeps clean accuracy** — " in markdown and (out / "tiny-signs.png").is_file()
    assert "gradshield experiment" in markdown  # names the command that regenerates it
    from gradshield.machine import cpu_name
    assert f"Trained on (recorded with each epoch's metrics; a model named twice was resumed " \
           f"elsewhere): cpu: {cpu_name()}" in markdown and ", float32: vanilla." in markdown
    # the cost of regenerating it: training from the epochs' records, attacks from the stored batches
    from gradshield.evaluation.store import compute_seconds
    stored = [compute_seconds(db)[0] for db in sorted((work / "runs").glob("*.db"))]
    trained = json.loads((work / "models" / "vanilla" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"- **Compute**: training {trained['elapsed_s'] / 60:.1f} min, attacks " \
           f"{sum(stored) / 60:.1f} min in {len(stored)} of {len(stored)} results files" in markdown
    assert f"analyses not counted), on: cpu: {cpu_name()}" in markdown
    first_md, first_json = markdown, (out / "tiny.json").read_text()
    (out / "tiny.md").unlink()
    assert main(["report", "--experiment", str(path), "--work-dir", str(work), "--out",
                 str(out)]) == 0
    assert (out / "tiny.md").read_text() == first_md
    assert (out / "tiny.json").read_text() == first_json


def test_the_same_examples_in_every_run_and_a_random_class_mix(finished):
    _, work, _ = finished
    labels = [load_run(db).labels for db in sorted((work / "runs").glob("*.db"))]
    for other in labels:
        assert np.array_equal(other, labels[0][:len(other)])
    assert len(set(labels[0][:8].tolist())) >= 4   # not sorted by class


def test_transfer_adversarials_are_crafted_once_and_scored_on_each_target(finished):
    path, work, _ = finished
    experiment = load_experiment(path)
    store = CraftedStore(Workspace(work).crafted)
    transfer_runs = [r for r in experiment.runs if r.through == "transfer"]
    assert len(transfer_runs) == 3
    assert len(store) == 2 * 3   # attacks x batches (24 / 8), not x 3 targets
    # an independent re-scoring of the stored FGSM adversarials on one target
    from gradshield.checkpoint import load_model
    from gradshield.defenses.concealment import conceal

    vanilla, _ = load_model(work / "models" / "vanilla" / "checkpoint.pt")
    gcm = conceal(vanilla, at="front")
    fgsm = {meta["generator"][2]: made.adversarial for meta, made in store.entries()
            if meta["attack"] == "fgsm-linf-8/255"}
    assert sorted(fgsm) == [0, 1, 2]
    x = torch.cat([fgsm[b] for b in range(3)])
    predicted = gcm(x).argmax(1).numpy()
    run = load_run(work / "runs" / "gcm-front__tiny-suite__transfer.db")
    attacked = run.success[0] >= 0
    assert attacked.any()
    assert np.array_equal(run.success[0][attacked] == 1, predicted[attacked] != run.labels[attacked])


def test_sigkill_in_the_middle_resumes_to_the_same_per_example_results(finished, tmp_path):
    _, reference_work, _ = finished
    path = _copy_experiment(tmp_path)
    work = tmp_path / "work"
    shutil.copytree(reference_work / "models", work / "models")  # the same trained model
    env = {**os.environ, "GRADSHIELD_DATA": str(data_dir().resolve())}
    command = [sys.executable, "-m", "gradshield", "experiment", str(path), "--work-dir", str(work),
               "--out", str(tmp_path / "out"), "--progress", "lines"]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.monotonic() + 120
    for line in process.stderr:  # kill after a few committed batches, before the end
        seen += line.startswith('{"done"')
        if seen >= 7 or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert seen >= 7 and not (tmp_path / "out" / "tiny.md").exists()  # killed mid-run
    partial = _results(work)
    assert sum(len(rows) for rows in partial.values()) < \
        sum(len(rows) for rows in _results(reference_work).values())
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _results(work) == _results(reference_work)


def test_every_experiment_in_the_repository_parses_and_defines_no_attack_of_its_own():
    """One definition of each paper's suite: experiments name suite files, never attacks."""
    files = sorted((REPO / "experiments").glob("*.toml"))
    assert files
    from gradshield.compat import tomllib

    for file in files:
        experiment = load_experiment(file)
        raw = tomllib.loads(file.read_text())
        assert "attack" not in raw and "suite" not in raw, file
        for run in experiment.runs:
            suite = experiment.suite(run.suite)
            assert suite.origin.startswith("builtin:"), (file, run.suite)


def test_no_second_results_pipeline_beside_the_product():
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py")}
    assert not scripts & {"gcm_experiment.py", "fgr_experiment.py", "training_curve.py"}


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('name = "tiny"', 'name = "tiny"\nnmae = 1', 1), "unknown key 'nmae'"),
    (lambda t: t.replace('models = ["vanilla", "gcm-front", "gcm-w"]', 'models = ["vanila"]'),
     "unknown model 'vanila'"),
    (lambda t: t.replace('name = "gcm-w{w:.0e}"', 'name = "gcm-w{eps}"'), "does not fit"),
    (lambda t: t.replace('attacks = ["pgd-linf-4/255"]', 'attacks = ["pgd-linf-5/255"]'),
     "not in suite"),
    (lambda t: t.replace('base = "vanilla"\ngcm = { at = "front" }', 'base = "nothing"\ngcm = {}', 1),
     "base model 'nothing' is not defined"),
    (lambda t: t.replace('through = "bpda"', 'through = "magic"'), "through must be one of"),
    (lambda t: t.replace('kind = "equal"', 'kind = "bigger"'), "kind must be one of"),
    (lambda t: t.replace('type = "claims"', 'type = "poem"'), "type must be one of"),
    (lambda t: t.replace('analysis = "signs"\nmodels', 'analysis = "nope"\nmodels'),
     "needs analysis"),
])
def test_bad_experiment_files_get_errors_naming_the_entry(edit, message):
    text = edit((DATA / "tiny-experiment.toml").read_text())
    with pytest.raises(GradshieldError, match=message):
        parse_experiment(text, DATA / "tiny-experiment.toml")


def test_a_model_trained_with_other_settings_is_refused_not_reused(finished, tmp_path):
    _, reference_work, _ = finished
    path = _copy_experiment(tmp_path)
    path.write_text(path.read_text().replace("epochs = 1,", "epochs = 2,"))
    work = tmp_path / "work"
    shutil.copytree(reference_work / "models", work / "models")
    with pytest.raises(GradshieldError, match="trained with other settings"):
        from gradshield.evaluation.execute import run_experiment

        run_experiment(load_experiment(path), Workspace(work), progress="none",
                       data_dir=data_dir())


@pytest.mark.parametrize("train, expected", [
    ({"model": "speedrun", "preset": "speedrun"}, {"label_smoothing": 0.2}),
    ({"model": "speedrun", "preset": "speedrun", "options": {"label_smoothing": 0.0}},
     {"label_smoothing": 0.0}),  # the file's option wins over the preset's
    ({"model": "compact"}, {"label_smoothing": 0.0}),
])
def test_an_experiment_model_gets_its_presets_recipe_options(train, expected):
    from gradshield.evaluation.execute import _recipe, _train_config

    recipe = _recipe(train, "model 'm'")
    assert {key: getattr(recipe, key) for key in expected} == expected
    assert _train_config(train, seed=0).lookahead == (train.get("preset") == "speedrun")
