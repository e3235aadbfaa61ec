"""The suite runner: resumes after SIGKILL with results equal to an uninterrupted run, refuses
foreign or corrupt results files without touching them, runs adaptive attacks through GCM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from gradshield.checkpoint import save_checkpoint
from gradshield.cli import build_parser, evaluate_suite
from gradshield.errors import GradshieldError
from gradshield.evaluation import compare_runs, load_run, run_suite, summarize
from gradshield.evaluation.suites import parse_suite
from gradshield.models import create_model
from tests.conftest import REPO, data_dir

TINY = """
name = "tiny"
[[attack]]
attack = "fgsm"
eps = "8/255"
[[attack]]
attack = "pgd"
eps = "2/255"
steps = 3
random_start = true
[[attack]]
attack = "random_noise"
eps = "8/255"
"""
N_EXAMPLES, SUBSET_SEED = 48, 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, _trained_compact):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    model = _trained_compact
    save_checkpoint(path, {"model_config": model.config.to_dict(), "model_state": model.state_dict()})
    return path


@pytest.fixture(scope="module")
def data(cifar):
    test = cifar[1].subset(N_EXAMPLES, seed=SUBSET_SEED)
    return (*test.as_float(), test.classes)


def _results(db) -> list[tuple]:
    with sqlite3.connect(db) as conn:  # everything but the wall-clock seconds
        return conn.execute("SELECT aid, idx, success, size, queries FROM results "
                            "ORDER BY aid, idx").fetchall()


def _command(suite_path, checkpoint, db) -> list[str]:
    return [sys.executable, "-m", "gradshield", "evaluate", "--checkpoint", str(checkpoint),
            "--suite", str(suite_path), "--db", str(db), "--data-dir", str(data_dir()),
            "--test-limit", str(N_EXAMPLES), "--seed", str(SUBSET_SEED), "--batch-size", "6",
            "--progress", "lines"]


def test_sigkill_then_rerun_resumes_and_equals_uninterrupted(tmp_path, checkpoint, trained_model, data):
    suite_path = tmp_path / "tiny.toml"
    suite_path.write_text(TINY)
    db = tmp_path / "killed.db"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(_command(suite_path, checkpoint, db), stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    attack_batches = 0
    for line in proc.stderr:  # one JSON line per committed batch
        if line.startswith("{") and json.loads(line)["done"] != "clean":
            attack_batches += 1
            if attack_batches == 10:  # mid-way through the second attack (8 batches per attack)
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = load_run(db)
    assert partial.meta["status"] == "running"
    assert 10 + 8 <= partial.complete_batches < partial.total_batches
    kept = _results(db)

    done = subprocess.run(_command(suite_path, checkpoint, db), capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed_lines = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    # the rerun did only the batches that were missing
    assert len(resumed_lines) == partial.total_batches - partial.complete_batches
    resumed = _results(db)
    assert set(kept) <= set(resumed)  # nothing that was committed was lost or changed

    x, y, classes = data
    reference = tmp_path / "uninterrupted.db"
    run_suite(trained_model, x, y, parse_suite(TINY), reference, seed=SUBSET_SEED, batch_size=6,
              classes=classes, progress="none", gradient_figure=False)
    assert resumed == _results(reference)
    final = load_run(db)
    assert final.complete and len(final.meta["commands"]) == 2
    untimed = lambda rows: json.dumps([{k: v for k, v in r.items() if k != "seconds_per_example"}
                                       for r in rows])  # as JSON, so that NaN == NaN
    assert untimed(summarize(db)["attacks"]) == untimed(summarize(reference)["attacks"])
    assert json.loads(done.stdout)["status"] == "complete"


def _snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def test_foreign_corrupt_or_other_run_files_are_refused_untouched(tmp_path, trained_model, data):
    x, y, classes = data
    x, y = x[:12], y[:12]
    suite = parse_suite(TINY)
    run = dict(seed=0, batch_size=6, classes=classes, progress="none", gradient_figure=False)

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite " * 100)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers(name TEXT)")
    for path, message in ((garbage, "not a readable gradshield results file"),
                          (foreign, "not a gradshield results file")):
        before = _snapshot(path)
        with pytest.raises(GradshieldError, match=message):
            run_suite(trained_model, x, y, suite, path, **run)
        assert _snapshot(path) == before

    db = tmp_path / "run.db"  # an SQLite file without tables (a run killed while creating it) is reused
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 7")  # a valid, non-empty file with no tables
    assert db.stat().st_size > 0
    run_suite(trained_model, x, y, suite, db, **run)
    before = _snapshot(db)
    other_suite = parse_suite(TINY.replace('"2/255"', '"4/255"'))
    other_model = create_model("compact", width=0.25)
    for kwargs, field in ((dict(suite=other_suite), "suite_digest"),
                          (dict(model=other_model), "model_fingerprint"),
                          (dict(images=x.flip(0)), "data_fingerprint"),
                          (dict(seed=1), "seed"), (dict(mode="worst-case"), "mode")):
        args = {"model": trained_model, "images": x, "labels": y, "suite": suite, **run, **kwargs}
        with pytest.raises(GradshieldError, match=rf"different run \(.*{field}.*was not modified"):
            run_suite(db_path=db, **args)
        assert _snapshot(db) == before
    # the same run again is a no-op resume with identical results
    first = _results(db)
    run_suite(trained_model, x, y, suite, db, **run)
    assert _results(db) == first


def test_checkpoint_classes_must_match_the_data(tmp_path, data):
    five = create_model("compact", num_classes=5, width=0.25)
    ckpt = tmp_path / "five.pt"
    save_checkpoint(ckpt, {"model_config": five.config.to_dict(), "model_state": five.state_dict()})
    suite_path = tmp_path / "tiny.toml"
    suite_path.write_text(TINY)
    args = build_parser().parse_args([
        "evaluate", "--suite", str(suite_path), "--checkpoint", str(ckpt), "--data-dir",
        str(data_dir()), "--test-limit", "12", "--db", str(tmp_path / "x.db"), "--samples", "2",
        "--progress", "none", "--batch-size", "6"])
    with pytest.raises(GradshieldError, match="has 5 classes but the data set cifar10 has 10"):
        evaluate_suite(args)
    assert not (tmp_path / "x.db").exists()
    x, y, classes = data
    with pytest.raises(GradshieldError, match="5 classes but the data set has 10"):
        run_suite(five, x, y, parse_suite(TINY), tmp_path / "y.db", classes=classes, progress="none")
    assert not (tmp_path / "y.db").exists()


ADAPTIVE = """
name = "adaptive-tiny"
[defaults]
steps = 5
[[attack]]
attack = "pgd"
eps = "8/255"
[[attack]]
attack = "pgd"
eps = "8/255"
through = "bpda"
[[attack]]
attack = "pgd"
eps = "8/255"
through = "transfer"
"""


def test_adaptive_attacks_through_gcm_and_worst_case_mode(tmp_path, trained_model, data, checkpoint):
    from gradshield.defenses.concealment import conceal

    x, y, classes = data
    # a transfer entry naming its own surrogate checkpoint (here: the same weights)
    suite = parse_suite(ADAPTIVE + f'[[attack]]\nattack = "pgd"\neps = "8/255"\nthrough = "transfer"\n'
                                   f'surrogate = "{checkpoint}"\nid = "pgd-transfer-file"\n')
    gcm = conceal(trained_model, at="front")
    common = dict(seed=0, batch_size=16, classes=classes, progress="none", gradient_figure=False)
    vanilla = summarize(run_suite(trained_model, x, y, suite, tmp_path / "vanilla.db", **common)["path"])
    masked = run_suite(gcm, x, y, suite, tmp_path / "gcm.db", **common)
    ra = {r["id"]: r["robust_accuracy"] for r in masked["attacks"]}
    plain = {r["id"]: r["robust_accuracy"] for r in vanilla["attacks"]}
    # GCM leaves predictions unchanged and defeats white-box PGD, not BPDA or transfer
    assert masked["clean_accuracy"] == vanilla["clean_accuracy"]
    assert ra["pgd-linf-8/255"] > ra["pgd-linf-8/255-bpda"] + 0.2
    assert ra["pgd-linf-8/255-bpda"] == pytest.approx(plain["pgd-linf-8/255"], abs=2 / N_EXAMPLES)
    assert ra["pgd-linf-8/255-transfer"] == pytest.approx(plain["pgd-linf-8/255"], abs=2 / N_EXAMPLES)
    assert ra["pgd-transfer-file"] == pytest.approx(plain["pgd-linf-8/255"], abs=2 / N_EXAMPLES)
    assert plain["pgd-transfer-file"] == plain["pgd-linf-8/255"]
    assert masked["worst_case_robust_accuracy"] <= min(ra.values())
    comparison = compare_runs(tmp_path / "vanilla.db", tmp_path / "gcm.db")
    assert comparison["same_examples"]
    row = next(r for r in comparison["attacks"] if r["id"] == "pgd-linf-8/255")
    assert row["only_b_robust"] > 0 and row["b_robust_accuracy"] == ra["pgd-linf-8/255"]

    # worst-case mode attacks only still-robust examples; its worst case equals per-attack mode's
    worst = run_suite(gcm, x, y, suite, tmp_path / "worst.db", mode="worst-case", **common)
    assert worst["worst_case_robust_accuracy"] == masked["worst_case_robust_accuracy"]
    per_attack, cumulative = load_run(tmp_path / "gcm.db"), load_run(tmp_path / "worst.db")
    assert np.array_equal(cumulative.success[0], per_attack.success[0])  # the first: the same run
    for a in range(1, len(suite.attacks)):  # each later one: exactly the examples still robust
        still_robust = cumulative.clean_correct & ~(cumulative.success[:a] == 1).any(0)
        assert np.array_equal(cumulative.success[a] >= 0, still_robust), a
    assert all(np.isnan(r["robust_accuracy"]) for r in worst["attacks"])
    # compared with a per-attack run, a worst-case run contributes its cumulative robustness
    last = compare_runs(tmp_path / "gcm.db", tmp_path / "worst.db")["attacks"][-1]
    assert last["b_robust_accuracy"] == worst["worst_case_robust_accuracy"]
    assert last["only_b_robust"] == 0


def test_results_file_records_each_machine_and_its_attack_time(tmp_path, trained_model, data, monkeypatch):
    from gradshield.evaluation import runner
    from gradshield.evaluation.store import compute_seconds
    from gradshield.machine import cpu_name

    x, y, classes = data
    db = tmp_path / "r.db"
    run = dict(seed=SUBSET_SEED, batch_size=24, classes=classes, progress="none", gradient_figure=False)
    run_suite(trained_model, x[:24], y[:24], parse_suite(TINY), db, **run)
    seconds, machines = compute_seconds(db)
    assert machines == [load_run(db).meta["machine"]] and cpu_name() in machines[0]
    with sqlite3.connect(db) as conn:  # the stored batches' own times, summed
        assert seconds == pytest.approx(conn.execute("SELECT SUM(seconds) FROM batches").fetchone()[0])
        assert seconds > 0
        conn.execute("DELETE FROM batches WHERE aid = 2")  # as if killed before the last attack
        conn.execute("DELETE FROM results WHERE aid = 2")
    monkeypatch.setattr(runner, "describe", lambda *a, **k: "cpu: another machine")
    run_suite(trained_model, x[:24], y[:24], parse_suite(TINY), db, **run)  # resumed there
    assert compute_seconds(db)[1] == [machines[0], "cpu: another machine"]
