"""Data-parallel training and sharded evaluation (torch.distributed, 2 gloo processes on the CPU):
N ranks on the global batch compute what one process computes on it, a sharded evaluation stores
per-example results identical to one process's, and a SIGKILL of one rank, then the same command,
resumes and finishes with the same results."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from gradshield import distributed
from gradshield.checkpoint import read_checkpoint, save_checkpoint
from gradshield.cli import main
from gradshield.data import iterate_batches
from gradshield.distributed import GlobalBatchNorm, global_batchnorm
from gradshield.errors import GradshieldError
from gradshield.evaluation import load_run, run_suite
from gradshield.evaluation.distributed import merge_shards, shard_folder
from gradshield.evaluation.store import open_results
from gradshield.evaluation.suites import parse_suite
from gradshield.training import train
from gradshield.utils import ShardGenerator, derived_generator, draw_rows
from tests import _distributed as work
from tests.conftest import REPO, data_dir

WORLD = 2
SUITE = """
name = "sharded"
[[attack]]
attack = "fgsm"
eps = "4/255"
[[attack]]
attack = "pgd"
eps = "2/255"
steps = 4
random_start = true
[[attack]]
attack = "square"
eps = "8/255"
max_queries = 30
[[attack]]
attack = "pgd"
eps = "4/255"
steps = 3
through = "transfer"
"""


@pytest.fixture
def one_thread():
    """References run with one thread, as each rank does (so float results cannot differ by the
    threads' share of a reduction)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, _trained_compact):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    model = _trained_compact
    save_checkpoint(path, {"model_config": model.config.to_dict(), "model_state": model.state_dict(),
                           "classes": list(work.load_dataset("cifar10", data_dir())[1].classes),
                           "image_shape": [3, 32, 32]})
    return path


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, checkpoint):
    """One launch of 2 gloo processes doing the scenario of tests/_distributed.py."""
    out = tmp_path_factory.mktemp("spawned")
    work.spawn(work.scenario, WORLD, str(out), str(data_dir()), str(checkpoint), SUITE)
    return out


def _rows(db, table, columns):
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2").fetchall()


PER_EXAMPLE = {"results": "aid, idx, success, size, queries",
               "examples": "idx, label, clean_pred, clean_correct",
               "samples": "aid, idx, success, shape, clean, adversarial, pshape, perturbation",
               "batches": "aid, batch, attacked"}


def _same_per_example(db, reference):
    for table, columns in PER_EXAMPLE.items():
        assert _rows(db, table, columns) == _rows(reference, table, columns), table


# ----------------------------------------------------------------------------- no processes


def test_shard_generator_gives_each_rank_its_rows_of_the_global_draws(cifar):
    data = cifar[0].subset(96, seed=0)
    whole = list(iterate_batches(data, 32, shuffle=True, augment=True, drop_last=True,
                                 generator=derived_generator(7, 0)))
    for rank in range(2):
        mine = list(iterate_batches(data, 32, shuffle=True, augment=True, drop_last=True,
                                    generator=ShardGenerator(derived_generator(7, 0).initial_seed(),
                                                             16 * rank, 16 * rank + 16, 32)))
        assert len(mine) == len(whole)
        rows = slice(16 * rank, 16 * rank + 16)
        for (x, y), (xw, yw) in zip(mine, whole, strict=True):
            assert torch.equal(x, xw[rows]) and torch.equal(y, yw[rows])
    g = ShardGenerator(3, 4, 8, 8)
    assert torch.equal(draw_rows(lambda k: torch.rand(k, 2, generator=g), 4, g),
                       torch.rand(8, 2, generator=torch.Generator().manual_seed(3))[4:])
    with pytest.raises(GradshieldError, match="rows 4:8"):
        draw_rows(lambda k: torch.rand(k, generator=g), 3, g)
    with pytest.raises(GradshieldError, match="batch_size=8"):
        next(iterate_batches(data, 16, shuffle=True, drop_last=True, generator=g))


def test_global_batchnorm_is_batchnorm_in_one_process_and_swaps_back(one_thread):
    torch.manual_seed(0)
    model = work.tiny_model(batchnorm=True).train()
    reference = work.tiny_model(batchnorm=True).train()
    x = torch.rand(8, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with global_batchnorm(model):
        assert sum(isinstance(m, GlobalBatchNorm) for m in model.modules()) == 7
        out = model(x)
    assert not any(isinstance(m, GlobalBatchNorm) for m in model.modules())
    assert torch.equal(out, reference(x))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in reference.state_dict().items():  # the running statistics were updated in place
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("running_mean"))

    class Fancy(nn.BatchNorm2d):  # e.g. timm's BatchNormAct2d: more than a BatchNorm in forward
        pass

    odd = nn.Sequential(nn.Conv2d(3, 4, 3), Fancy(4))
    with pytest.raises(GradshieldError, match="Fancy"), global_batchnorm(odd):
        pass


@pytest.mark.parametrize("affine", [True, False])
def test_normalisation_by_given_statistics_is_differentiable_twice(affine):
    """The fused normalisation GlobalBatchNorm applies with the global statistics: its gradient
    (PyTorch's kernel, or differentiable operations while a graph is built) and the gradient of
    that gradient against float64 finite differences."""
    from gradshield.distributed.batchnorm import _Normalize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    mean = torch.randn(2, dtype=torch.float64, generator=g).requires_grad_()
    var = (torch.rand(2, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    params = [torch.randn(2, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2)] \
        if affine else [None, None]
    inputs = (x, mean, var, *[p for p in params if p is not None])

    def normalise(x, mean, var, *wb):
        weight, bias = wb if affine else (None, None)
        return _Normalize.apply(x, mean, var, weight, bias, 1e-5)

    assert torch.autograd.gradcheck(normalise, inputs)
    assert torch.autograd.gradgradcheck(normalise, inputs)
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=g)
    kernel = torch.autograd.grad(normalise(*inputs), inputs, upstream)
    graph = torch.autograd.grad(normalise(*inputs), inputs, upstream, create_graph=True)
    for a, b in zip(kernel, graph, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_batch_statistics_match_var_mean_and_are_differentiable_twice():
    from gradshield.distributed.batchnorm import _Moments

    g = torch.Generator().manual_seed(1)
    x = (3 + torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)).requires_grad_()
    mean, var = _Moments.apply(x, 1e-5)
    expected_var, expected_mean = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: _Moments.apply(x, 1e-5), (x,))
    assert torch.autograd.gradgradcheck(lambda x: _Moments.apply(x, 1e-5), (x,))
    low = (3 + torch.randn(3, 2, 4, 4, generator=g)).to(torch.bfloat16)  # autocast's activations
    mean, var = _Moments.apply(low, 1e-5)
    expected_var, expected_mean = torch.var_mean(low.float(), dim=[0, 2, 3], correction=0)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(var, expected_var, rtol=1e-5, atol=1e-7)


def test_single_process_run_merges_shards_a_killed_launch_left(tmp_path, trained_model, cifar, one_thread):
    """A launch killed mid-way leaves shard files; a one-process rerun of the same evaluation
    merges them and runs only what they lack, ending equal to an uninterrupted run."""
    x, y = cifar[1].subset(32, seed=0).as_float()
    suite = parse_suite(SUITE)
    reference = tmp_path / "reference.db"
    run_suite(trained_model, x, y, suite, reference, batch_size=8, progress="none",
              gradient_figure=False)
    # a rank's shard: the same run's batches 1 and 3 (batch numbers as one process numbers them)
    shard_source = tmp_path / "shard-source.db"
    run_suite(trained_model, x, y, suite, shard_source, batch_size=8, progress="none",
              gradient_figure=False)
    db = tmp_path / "resumed.db"
    folder = shard_folder(db)
    folder.mkdir()
    shard = folder / "rank-0001-of-0002.db"
    conn = sqlite3.connect(shard_source)
    conn.execute("DELETE FROM batches WHERE batch NOT IN (1, 3)")
    conn.execute("DELETE FROM results WHERE NOT ((idx >= 8 AND idx < 16) OR (idx >= 24 AND idx < 32))")
    conn.commit()
    conn.close()
    shard_source.rename(shard)
    summary = run_suite(trained_model, x, y, suite, db, batch_size=8, progress="none",
                        gradient_figure=False)
    assert not folder.exists()
    _same_per_example(db, reference)
    assert summary["status"] == "complete"
    # merging is refused for a shard of another run
    folder.mkdir()
    other = folder / "rank-0000-of-0002.db"
    run_suite(trained_model, x[:16], y[:16], suite, other, batch_size=8, progress="none",
              gradient_figure=False)
    conn, meta = open_results(db)
    with pytest.raises(GradshieldError, match="another run"):
        merge_shards(conn, db, {k: meta[k] for k in ("examples", "seed", "batch_size")},
                     samples_per_attack=4, batch_size=8)
    conn.close()


def test_commands_torchrun_does_not_run_are_refused(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched()
    assert main(["models"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def test_global_batch_must_split_evenly(monkeypatch, cifar, tmp_path):
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(0, 3, 0))
    with pytest.raises(GradshieldError, match="multiple of the 3 processes"):
        train(work.tiny_model(False), cifar[0].subset(64, seed=0), None, work.EPOCH_CONFIG, tmp_path,
              progress=False)


# ----------------------------------------------------------------------------- 2 gloo processes


@pytest.mark.parametrize("batchnorm", [False, True], ids=["no-batchnorm", "batchnorm"])
def test_one_epoch_on_two_ranks_equals_one_process_on_the_global_batch(spawned, batchnorm, tmp_path,
                                                                       one_thread):
    """Each rank's half of every global batch, augmented as one process augments it, gradients
    averaged, BatchNorm over the global batch: the epoch's weight updates equal one process's up
    to float rounding (the sums over the batch are split in two; BatchNorm's statistics are
    combined from the two halves)."""
    train_data, test_data = work.epoch_data(str(data_dir()))
    model = work.tiny_model(batchnorm, "average")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(model, train_data, test_data, work.EPOCH_CONFIG, tmp_path, progress=False)
    blob = read_checkpoint(spawned / f"epoch-bn{int(batchnorm)}" / "checkpoint.pt")
    assert blob["world_size"] == WORLD
    ours, theirs = blob["model_state"], model.state_dict()
    assert ours.keys() == theirs.keys()
    tolerance = 1e-3 if batchnorm else 1e-4
    for key, value in theirs.items():
        if not value.is_floating_point():
            assert torch.equal(ours[key], value), key
            continue
        update = value - initial[key]
        if update.abs().max() == 0:  # e.g. the input normalisation constants
            assert torch.equal(ours[key], value), key
            continue
        gap = (ours[key] - initial[key] - update).abs().max() / update.abs().max()
        assert gap < tolerance, (key, float(gap))
    metrics = blob["metrics"][0]  # correct counts summed over the ranks' shares of the test set;
    # the weights differ by rounding, which may flip one borderline prediction
    assert abs(metrics["test_acc"] - history[0]["test_acc"]) <= 1 / work.EPOCH_TEST + 1e-9
    assert metrics["train_loss"] == pytest.approx(history[0]["train_loss"], rel=1e-5)


def test_every_recipe_gives_the_global_batch_gradient_under_ddp(spawned, one_thread):
    """Double backpropagation (IGR, FGR, FGR+ADT) included: BatchNorm over the global batch is
    differentiable twice, so each rank's input gradients carry the other ranks' terms."""
    stored = torch.load(spawned / "gradients.pt", weights_only=True)
    reference = work.recipe_gradients(None, 1)
    for name, grads in reference.items():
        # the finite difference divides a float32 loss difference by its step: looser
        rtol = 1e-3 if name == "fgr_finite_difference" else 1e-4
        for ours, theirs in zip(stored["synced"][name], grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max()),
                                       msg=name)
    # without BatchNorm over the global batch, each rank normalises its own half: another gradient
    gap = max(float((a - b).abs().max() / b.abs().max())
              for a, b in zip(stored["unsynced"], reference["standard"], strict=True))
    assert gap > 1e-2


def test_sharded_evaluation_stores_what_one_process_stores(spawned, checkpoint, cifar, one_thread, tmp_path):
    from gradshield.checkpoint import load_model

    model, _ = load_model(checkpoint)
    x, y = cifar[1].subset(work.EVAL_EXAMPLES, seed=0).as_float()
    reference = tmp_path / "one-process.db"
    run_suite(model, x, y, parse_suite(SUITE), reference, seed=0, batch_size=work.EVAL_BATCH,
              progress="none", crafted=tmp_path / "crafted.db", gradient_figure=False)
    db = spawned / "eval.db"
    _same_per_example(db, reference)
    run = load_run(db)
    assert run.complete and (run.success >= 0).sum() > 100
    assert not shard_folder(db).exists() and not shard_folder(spawned / "crafted.db").exists()
    with sqlite3.connect(spawned / "crafted.db") as conn:  # the ranks' transfer adversarials, merged
        crafted = conn.execute("SELECT COUNT(*) FROM crafted").fetchone()[0]
    assert crafted == work.EVAL_EXAMPLES // work.EVAL_BATCH


# ----------------------------------------------------------------------------- torchrun, SIGKILL


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
            f"--master-port={work.free_port()}", "-m", "gradshield", *args]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO),
            "GRADSHIELD_DATA": str(data_dir()), "OMP_NUM_THREADS": "1"}


def _start(command: list[str], where: Path) -> subprocess.Popen:
    with open(where / "killed.log", "w") as log:  # the launcher's and workers' output
        return subprocess.Popen(command, env=_env(), cwd=where, stdout=log, stderr=subprocess.STDOUT)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the launcher's children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _kill_when(launcher: subprocess.Popen, rank: int, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert launcher.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = _rank_pid(launcher, rank)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout=120)
    assert launcher.returncode != 0


def test_torchrun_train_killed_rank_then_rerun_resumes_exactly(spawned, tmp_path):
    s = work.CLI_TRAIN
    out = tmp_path / "run"
    command = _torchrun("train", "--model", "compact", "--width", str(s["width"]),
                        "--epochs", str(s["epochs"]), "--batch-size", str(s["batch_size"]),
                        "--lr", str(s["lr"]), "--seed", str(s["seed"]),
                        "--train-limit", str(s["train_limit"]), "--test-limit", str(s["test_limit"]),
                        "--defense", s["defense"], "--out", str(out), "--quiet")
    launcher = _start(command, tmp_path)
    ckpt = out / "checkpoint.pt"
    _kill_when(launcher, 1, ckpt.is_file)  # rank 1 dies in the second epoch
    killed_at = read_checkpoint(ckpt)["epoch"]
    assert killed_at < s["epochs"] - 1
    done = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["processes"] == WORLD
    resumed = read_checkpoint(ckpt)
    uninterrupted = read_checkpoint(spawned / "cli-like" / "checkpoint.pt")
    assert resumed["epoch"] == uninterrupted["epoch"] == s["epochs"] - 1
    for key, value in uninterrupted["model_state"].items():
        assert torch.equal(resumed["model_state"][key], value), key
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "eval_s")} for r in rows]
    assert drop(resumed["metrics"]) == drop(uninterrupted["metrics"])


def test_torchrun_evaluate_killed_rank_then_rerun_equals_one_process(checkpoint, cifar, tmp_path, one_thread):
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE)
    db = tmp_path / "sharded.db"
    command = _torchrun("evaluate", "--checkpoint", str(checkpoint), "--suite", str(suite),
                        "--db", str(db), "--test-limit", str(work.EVAL_EXAMPLES), "--batch-size",
                        str(work.EVAL_BATCH), "--mode", "worst-case", "--progress", "none")
    launcher = _start(command, tmp_path)
    shard = shard_folder(db) / f"rank-0000-of-{WORLD:04d}.db"

    def attacked() -> bool:  # rank 0 has committed its first attack batch
        try:
            with sqlite3.connect(f"file:{shard}?mode=ro", uri=True) as conn:
                return conn.execute("SELECT COUNT(*) FROM batches WHERE aid >= 0").fetchone()[0] > 0
        except sqlite3.Error:
            return False

    _kill_when(launcher, 0, attacked)  # rank 0 (the one that merges) dies
    partial, _ = open_results(db)
    status = partial.execute("SELECT value FROM meta WHERE key = 'status'").fetchone()[0]
    assert json.loads(status) == "running"
    partial.close()
    done = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "complete"

    from gradshield.checkpoint import load_model

    model, _ = load_model(checkpoint)
    x, y = cifar[1].subset(work.EVAL_EXAMPLES, seed=0).as_float()
    reference = tmp_path / "one-process.db"
    run_suite(model, x, y, parse_suite(SUITE), reference, seed=0, batch_size=work.EVAL_BATCH,
              mode="worst-case", progress="none")
    _same_per_example(db, reference)
    run = load_run(db)
    assert run.complete and len(run.meta["commands"]) == 2
    assert not shard_folder(db).exists()
