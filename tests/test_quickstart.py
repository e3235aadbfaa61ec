"""The README's main job, ``gradshield quickstart``, end to end in a tiny setting, and the suite
files it and the other commands load."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from importlib import resources

import torch

from gradshield.checkpoint import read_checkpoint
from gradshield.cli import quickstart_table
from gradshield.evaluation import load_run, summarize
from gradshield.evaluation.report import artifacts
from gradshield.evaluation.suites import attack_function, builtin_suites, load_suite
from gradshield.training import CHECKPOINT_NAME

CIFAR = (3, 32, 32)


def test_every_builtin_suite_file_loads_and_its_settings_fit_the_attacks():
    files = {p.name[:-5] for p in resources.files("gradshield").joinpath("suites").iterdir()
             if p.name.endswith(".toml")}
    assert files == set(builtin_suites()) and {"quickstart", "gcm-paper", "fgr-paper",
                                               "adaptive"} <= files
    x, y = torch.zeros(1, *CIFAR), torch.zeros(1, dtype=torch.long)
    for name in sorted(files):
        suite = load_suite(name)
        assert suite.name == name and suite.attacks and suite.description
        assert len({a.id for a in suite.attacks}) == len(suite.attacks)
        for spec in suite.attacks:
            # the runner calls function(model, x, y, **kwargs): every setting must be a parameter
            inspect.signature(attack_function(spec.attack)).bind(torch.nn.Identity(), x, y,
                                                                 **spec.kwargs_for(CIFAR))
    quickstart = load_suite("quickstart")
    assert [(a.attack, a.through) for a in quickstart.attacks] == [
        ("fgsm", "model"), ("pgd", "model"), ("pgd", "bpda"), ("pgd", "transfer"),
        ("square", "model"), ("random_noise", "model")]
    assert {round(a.eps_for(CIFAR) * 255, 6) for a in quickstart.attacks} == {8.0}


def test_quickstart_runs_end_to_end_and_prints_the_stored_results(tmp_path):
    """The README's first command with a tiny setting (2 epochs on 1000 images, 100 test images),
    run in a fresh folder as a user would. Its table must be the stored results, and the
    properties that hold for any model must show: GCM changes no prediction, and its autograd
    gradient disagrees with finite differences while the undefended model's does not."""
    command = [sys.executable, "-m", "gradshield", "quickstart", "--train-limit", "1000",
               "--test-limit", "100", "--epochs", "2", "--batch-size", "64", "--quiet",
               "--out", "run"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=os.environ.copy())  # the data folder: $GRADSHIELD_DATA (absolute)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    assert read_checkpoint(out / "model" / CHECKPOINT_NAME)["epoch"] == 1
    names = ("undefended", "gcm-front")
    ids = [a.id for a in load_suite("quickstart").attacks]
    for name in names:
        run = load_run(out / f"{name}.db")
        assert run.complete and run.n == 100 and [a["id"] for a in run.attacks] == ids
    summaries = [summarize(out / f"{name}.db") for name in names]
    assert quickstart_table(*summaries) in done.stdout
    assert summaries[0]["clean_accuracy"] == summaries[1]["clean_accuracy"]
    flagged = {name: json.loads(artifacts(out / f"{name}.db")["diagnostics"])["flagged"]
               for name in names}
    assert "gradient_disagrees_with_finite_differences" in flagged["gcm-front"]
    assert "gradient_disagrees_with_finite_differences" not in flagged["undefended"]
    report = (out / "report" / "report.md").read_text()
    assert all(f"{name}: RA; AR" in report for name in names)
    assert (out / "report" / "report.html").stat().st_size > 0
    assert done.stdout.rstrip().endswith(f"report: {os.path.join('run', 'report', 'report.html')}")
