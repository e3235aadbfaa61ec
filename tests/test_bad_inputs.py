"""Bad inputs a user can give and the error each one gets: the cases of docs/errors.md.

The table in docs/errors.md is generated from ``CASES`` below, so the two cannot drift:
``test_docs_table_is_generated_from_these_cases`` fails when they differ, and
``python -m tests.test_bad_inputs`` rewrites the table. Each case triggers its bad input for real
(through the CLI's ``main()`` where the input is a command-line option or file, else through the
Python API) and checks the message against the documented one, where ``…`` stands for a part that
varies (paths, numbers). CLI cases also check the exit code 2.
"""

from __future__ import annotations

import contextlib
import io
import re
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gradshield.attacks import pgd
from gradshield.checkpoint import read_checkpoint, save_checkpoint
from gradshield.cli import main
from gradshield.data import CIFAR10_CLASSES, load_archive
from gradshield.errors import GradshieldError
from gradshield.evaluation import run_suite
from gradshield.evaluation.suites import load_suite, parse_suite
from gradshield.models import create_model
from tests._bad_files import (
    DIGITS,
    HTML_PAGE,
    image_archive,
    image_folder,
    png,
    tiny_checkpoint,
    write_malicious,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
BEGIN = "<!-- BEGIN TABLE: generated from tests/test_bad_inputs.py (python -m tests.test_bad_inputs) -->"
END = "<!-- END TABLE -->"
ONE_ATTACK = 'name = "one"\n[[attack]]\nattack = "fgsm"\neps = "8/255"\n'


@dataclass(frozen=True)
class Case:
    """One row: where the input is given, what is wrong with it, the message (… = varies)."""

    where: str
    bad_input: str
    message: str
    trigger: Callable[[SimpleNamespace], str]  # makes the bad input, returns the error message


def cli(*argv) -> Callable[[SimpleNamespace], str]:
    """Run ``gradshield ARGV`` (``{name}`` fields filled from the fixture); expect exit code 2."""
    def run(w: SimpleNamespace) -> str:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a).format(**vars(w)) for a in argv])
        text = stderr.getvalue().strip()
        assert code == 2, f"exit code {code}, stderr {text!r}"
        assert text.startswith("gradshield: error: "), text
        return text[len("gradshield: error: "):]
    return run


def api(call: Callable[[SimpleNamespace], object]) -> Callable[[SimpleNamespace], str]:
    """Call the Python API; expect a GradshieldError."""
    def run(w: SimpleNamespace) -> str:
        with pytest.raises(GradshieldError) as caught:
            call(w)
        return str(caught.value)
    return run


def _attack(x=None, y=None, **kw):
    return lambda w: pgd(w.model, w.x if x is None else x(w), w.y if y is None else y(w), eps=8 / 255,
                         steps=1, **kw)


def _without(module: str, call: Callable[[], object]) -> object:
    """``call()`` as if ``module`` were not installed."""
    from unittest import mock

    with mock.patch.dict(sys.modules, {module: None}):
        return call()


def _other_run(w):
    db = w.root / "other-run.db"
    if not db.exists():
        run_suite(w.model, w.x, w.y, parse_suite(ONE_ATTACK), db, progress="none",
                  gradient_figure=False)
    run_suite(w.model, w.x, w.y, parse_suite(ONE_ATTACK), db, seed=1, progress="none")


CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- checkpoints and weights files
    "checkpoint-missing": Case(
        "`evaluate --checkpoint`", "a path that does not exist",
        "checkpoint not found: …; train one with `gradshield train` or check the path",
        cli("evaluate", "--checkpoint", "{root}/nowhere.pt")),
    "checkpoint-empty": Case(
        "`evaluate --checkpoint`", "an empty file (0 bytes)",
        "checkpoint … is empty (0 bytes); copy or download it again, or re-run the training that "
        "wrote it (training resumes from the last good epoch)",
        cli("evaluate", "--checkpoint", "{empty}")),
    "checkpoint-truncated": Case(
        "`evaluate --checkpoint`", "a truncated checkpoint (a third of the file)",
        "checkpoint … is truncated or corrupt (its zip container is incomplete: the file ends early); "
        "copy or download it again, or re-run the training that wrote it (training resumes from the "
        "last good epoch)",
        cli("evaluate", "--checkpoint", "{truncated}")),
    "checkpoint-malicious": Case(
        "`evaluate --checkpoint` (`--surrogate`, a suite's `surrogate = \"path\"`, weights files, "
        "cached data, training resume: tests/test_security.py)",
        "a pickle that would run code (`os.system`) inside a well-formed checkpoint",
        "checkpoint … was refused: it asks for the Python object …system. gradshield reads files only "
        "as tensors and plain data (torch.load with weights_only=True), so nothing in the file ran; "
        "a file that asks for more was not written by gradshield, is corrupt, or was crafted to run "
        "code. Do not load it with weights_only=False unless you trust its source; …",
        cli("evaluate", "--checkpoint", "{malicious}")),
    "checkpoint-html": Case(
        "`evaluate --checkpoint`", "a saved web page (`<!DOCTYPE html ...`, a failed download)",
        "checkpoint … is a saved web page (HTML), not a PyTorch file: the download probably failed "
        "(a login, error or redirect page was saved instead of the file); download it again and "
        "check that it finished",
        cli("evaluate", "--checkpoint", "{html}")),
    "checkpoint-lfs": Case(
        "`evaluate --checkpoint`", "a Git LFS pointer instead of the file",
        "checkpoint … is a Git LFS pointer (a small text file standing in for the real one), not a "
        "PyTorch file: fetch the real file with `git lfs pull` (or download it directly)",
        cli("evaluate", "--checkpoint", "{lfs}")),
    "checkpoint-foreign": Case(
        "`evaluate --checkpoint`", "a `.pt` file not written by gradshield (a bare state dict)",
        "… is not a gradshield checkpoint (no 'format': 'gradshield-checkpoint'); to use weights from "
        "elsewhere, build the model with gradshield.models.create_model and load_state_dict yourself",
        cli("evaluate", "--checkpoint", "{foreign}")),
    "checkpoint-newer": Case(
        "`evaluate --checkpoint`", "a checkpoint written by a newer gradshield",
        "… was written by a newer gradshield (version 99 > 1); upgrade gradshield",
        cli("evaluate", "--checkpoint", "{newer}")),
    "checkpoint-weights-mismatch": Case(
        "`evaluate --checkpoint`", "weights that do not fit the architecture the file names",
        "the checkpoint … does not fit this model (compact, width 1.0, 10 classes): … Build the model "
        "the checkpoint was trained with (gradshield.checkpoint.load_model does it from the file)",
        cli("evaluate", "--checkpoint", "{lying}")),
    "class-names": Case(
        "`evaluate --checkpoint` (and `--suite`: tests/test_data_identity.py)",
        "data with other classes than the checkpoint's (digits '0'..'9' vs CIFAR-10)",
        "the checkpoint … was trained on the classes ['0', '1', '2', '3', ...] (10) but the data set "
        "folder has the classes ['airplane', 'automobile', 'bird', 'cat', ...] (10); its accuracy "
        "there would mean nothing. Evaluate it on the data set it was trained on (--dataset, "
        "--data-dir)",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--dataset", "folder", "--data-dir",
            "{cifarlike}")),
    "class-count": Case(
        "`evaluate --checkpoint` (and `--suite`)", "data with another number of classes",
        "the checkpoint … has 10 classes but the data set folder has 3 ['0', '1', '2'] (3); evaluate "
        "it on the data set it was trained on (--dataset, --data-dir)",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--dataset", "folder", "--data-dir",
            "{three}")),
    "image-size": Case(
        "`evaluate --checkpoint` (and `--suite`)", "images of another size than the training images",
        "the checkpoint … was trained on 32x32 images but the data set folder has 24x24 images; "
        "evaluate it on the data set it was trained on (--dataset, --data-dir), or resize the images "
        "to 32x32 (an image folder: --dataset folder --image-size 32 32, or load_dataset(..., "
        "image_size=(32, 32)))",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--dataset", "folder", "--data-dir",
            "{digits}", "--image-size", "24", "24")),
    "run-suite-classes": Case(
        "`run_suite(model, x, y, suite, db, classes=...)`",
        "a model loaded from a checkpoint, and the class names of another data set",
        "the model was trained on the classes ['0', '1', '2', '3', ...] (10) but the data set has the "
        "classes ['airplane', 'automobile', 'bird', 'cat', ...] (10); its accuracy there would mean "
        "nothing. Evaluate it on the data set it was trained on (--dataset, --data-dir)",
        api(lambda w: run_suite(w.loaded, w.x, w.y, parse_suite(ONE_ATTACK), w.root / "never.db",
                                classes=CIFAR10_CLASSES, progress="none"))),
    "weights-html": Case(
        "`evaluate --model NAME --weights FILE`, `create_model(NAME, weights=FILE)`",
        "a saved web page",
        "weights file … is a saved web page (HTML), not a PyTorch file: the download probably failed …",
        api(lambda w: create_model("torchvision:resnet18", weights=w.html))),
    "weights-other-model": Case(
        "`evaluate --model NAME --weights FILE`, `create_model(NAME, weights=FILE)`",
        "a state dict of another architecture or class count",
        "could not load … into torchvision:resnet18: Error(s) in loading state_dict for ResNet: … "
        "It must be a state dict of torchvision:resnet18 with 10 classes: is the file for another "
        "architecture, class count or input size?",
        api(lambda w: create_model("torchvision:resnet18", num_classes=10, weights=w.foreign))),
    "weights-missing": Case(
        "`evaluate --model NAME --weights FILE`, `create_model(NAME, weights=FILE)`",
        "a path that does not exist",
        "weights file not found: …; check the path (gradshield never downloads weights)",
        api(lambda w: create_model("torchvision:resnet18", weights=w.root / "no.pth"))),
    "timm-name": Case(
        "`evaluate --model timm:NAME`, `create_model(\"timm:NAME\")`", "a timm model that does not exist",
        "timm has no model 'deit_smal_patch16_224' (did you mean deit_small_patch16_224, …?); "
        "timm.list_models('*pattern*') lists them (timm …)",
        api(lambda w: create_model("timm:deit_smal_patch16_224"))),
    "timm-missing": Case(
        "`evaluate --model timm:NAME`", "timm not installed",
        "timm models need the timm package, which is not installed: pip install 'gradshield[timm]' "
        "(or pip install timm)",
        api(lambda w: _without("timm", lambda: create_model("timm:deit_small_patch16_224")))),
    "robustbench-file-missing": Case(
        "`evaluate --model robustbench:NAME --weights MODEL_DIR`",
        "a model_dir without the model's file",
        "RobustBench weights not found: …/cifar10/Linf/Carmon2019Unlabeled.pt (RobustBench's "
        "model_dir layout is <model_dir>/cifar10/Linf/Carmon2019Unlabeled.pt). gradshield never "
        "downloads: get the file once where there is internet, e.g. robustbench.utils.load_model("
        "'Carmon2019Unlabeled', model_dir='models', dataset='cifar10', threat_model='Linf'), and "
        "pass that model_dir (or the .pt file)",
        cli("evaluate", "--model", "robustbench:Carmon2019Unlabeled", "--weights", "{root}",
            "--dataset", "folder", "--data-dir", "{cifarlike}", "--suite", "quickstart")),
    "imagenet-flat-val": Case(
        "`--dataset imagenet --data-dir`", "a val/ folder of images without class folders",
        "…/val holds 2 images but no class folders: the ILSVRC2012 validation archive unpacks flat. "
        "Move each image into val/<wnid>/ (its class: the LOC_val_solution.csv labels, or the "
        "widely used valprep.sh script) and rerun",
        cli("evaluate", "--model", "torchvision:resnet18", "--weights", "{tv_weights}",
            "--dataset", "imagenet", "--data-dir", "{flat_imagenet}")),
    "imagenet-no-val": Case(
        "`--dataset imagenet --data-dir`", "a folder without `val/` (e.g. the val folder itself)",
        "… has no val/ folder; --dataset imagenet reads <data-dir>/val/<class>/<image> (ImageNet: "
        "<data-dir>/val/n01440764/*.JPEG ...). … itself looks like a split (its sub-folders […] hold "
        "images): pass its parent folder as --data-dir",
        cli("evaluate", "--model", "torchvision:resnet18", "--weights", "{tv_weights}",
            "--dataset", "imagenet", "--data-dir", "{cifarlike}/test")),
    "model-and-checkpoint-missing": Case(
        "`evaluate`", "neither --checkpoint nor --model",
        "evaluate needs --checkpoint FILE (written by gradshield train) or --model NAME --weights "
        "FILE (torchvision:NAME, timm:NAME, robustbench:NAME)",
        cli("evaluate", "--suite", "quickstart")),
    "cache-malicious": Case(
        "the cache (`--cache-dir`)", "a cached data file replaced by a pickle that would run code",
        "cached data file … was refused: it asks for the Python object …; delete it and rerun (it is "
        "rebuilt from the archive)",
        api(lambda w: load_archive(w.archive, w.cache))),
    # ---------------------------------------------------------------- data sets
    "archive-missing": Case(
        "`--data-dir`", "a folder without the data archive",
        "data archive not found: …/cifar10-jpeg.tar.gz. Point --data-dir (or $GRADSHIELD_DATA) at the "
        "folder that holds cifar10-jpeg.tar.gz, e.g. --data-dir ../shared/datasets",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--dataset", "cifar10-jpeg", "--data-dir",
            "{root}")),
    "archive-corrupt": Case(
        "`--data-dir`", "a corrupt or truncated archive",
        "the archive … is corrupt or truncated (…); copy it again from its source (the bundled one is "
        "../shared/datasets/cifar10-jpeg.tar.gz)",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--dataset", "cifar10-jpeg", "--data-dir",
            "{corrupt_dir}", "--cache-dir", "{cache}")),
    "folder-missing": Case(
        "`--dataset folder --data-dir`", "a folder without `train/` and `test/`",
        "image folder not found: …/train; --dataset folder reads <data-dir>/train/<class>/<image> and "
        "<data-dir>/test/<class>/<image>",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--dataset", "folder", "--data-dir",
            "{root}/nowhere")),
    "folder-mixed-sizes": Case(
        "`--dataset folder`", "images of different sizes",
        "images in … have different sizes …; pass image_size=(H, W) (CLI: --image-size) to resize "
        "them on load",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--dataset", "folder", "--data-dir",
            "{mixed}")),
    "image-size-not-folder": Case(
        "`--image-size`", "given for a data set of fixed size (CIFAR)",
        "image_size (--image-size) resizes image folders on load; data set 'cifar10' has a fixed "
        "size, so drop it (or use --dataset folder)",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--image-size", "24", "24")),
    # ---------------------------------------------------------------- tensors to the Python API
    "images-range": Case(
        "images to an attack or `run_suite`", "values outside [0, 1] (e.g. 0..255 or normalised)",
        "images must lie in [0, 1], found values in […]; pass unnormalised pixels (divide uint8 by "
        "255) — normalisation belongs inside the model",
        api(_attack(x=lambda w: w.x * 255))),
    "images-uint8": Case(
        "images to an attack or `run_suite`", "uint8 images",
        "images must be floating point in [0, 1], got dtype torch.uint8; convert uint8 images with "
        "x.float() / 255",
        api(_attack(x=lambda w: (w.x * 255).to(torch.uint8)))),
    "images-nan": Case(
        "images to an attack or `run_suite`", "NaN values",
        "images contain NaN values; clean the input before attacking",
        api(_attack(x=lambda w: w.x.masked_fill(w.x > 0.99, float("nan"))))),
    "images-no-batch": Case(
        "images to an attack or `run_suite`", "one image (C, H, W) without the batch dimension",
        "images must have shape (N, C, H, W), got (3, 32, 32); add a batch dimension with "
        "x.unsqueeze(0) for a single image",
        api(_attack(x=lambda w: w.x[0]))),
    "labels-shape": Case(
        "labels to an attack or `run_suite`", "labels of shape (N, 1) or one-hot",
        "labels must have shape (4,) to match the images, got (4, 1); pass one class index per "
        "image (y.view(-1); for one-hot labels y.argmax(1))",
        api(_attack(y=lambda w: w.y[:, None]))),
    "labels-range": Case(
        "labels to an attack or `run_suite`", "a label >= the model's number of classes",
        "labels must be < the number of classes (10), found 10; check that the model and the data "
        "set have the same classes",
        api(lambda w: run_suite(w.model, w.x, w.y + 7, parse_suite(ONE_ATTACK), w.root / "never.db",
                                progress="none"))),
    "labels-float": Case(
        "labels to an attack or `run_suite`", "float labels",
        "labels must be an integer tensor (torch.long), got torch.float32; convert them with y.long()",
        api(_attack(y=lambda w: w.y.float()))),
    "target-is-label": Case(
        "a targeted attack (`targeted=True, labels=...`)", "a target equal to the true label",
        "1 target(s) equal the true label (first at index 0); a targeted attack needs a target class "
        "different from the label, e.g. (labels + 1) % num_classes",
        api(_attack(y=lambda w: torch.tensor([0, 2, 3, 4]), targeted=True, labels=torch.arange(4)))),
    # ---------------------------------------------------------------- suites
    "suite-unknown-attack": Case(
        "a suite file (`--suite FILE`)", "an unknown attack name",
        "suite …, attack #1: unknown attack 'pgdd'; did you mean …? choose one of […]",
        cli("evaluate", "--suite", "{bad_attack_suite}", "--checkpoint", "{checkpoint}")),
    "suite-budget": Case(
        "a suite file (`--suite FILE`)", "a budget that is not a number or a fraction",
        "suite …, attack #1 (eps): cannot read the budget '8/2x5'; write a number (0.03) or a "
        "fraction of pixel levels ('8/255')",
        api(lambda w: parse_suite('[[attack]]\nattack = "pgd"\neps = "8/2x5"\n'))),
    "suite-key": Case(
        "a suite file (`--suite FILE`)", "an unknown top-level key",
        "suite …: unknown top-level key 'atack' (did you mean 'attack'?); allowed: […]. Attack "
        "settings belong inside an [[attack]] table",
        api(lambda w: parse_suite('[[atack]]\nattack = "pgd"\neps = "8/255"\n'))),
    "suite-attack-key": Case(
        "a suite file (`--suite FILE`)", "an unknown setting of an attack",
        "suite …, attack #1: unknown key 'stepz' for attack 'pgd'; did you mean 'steps'? its "
        "settings are […], plus the entry keys […]",
        api(lambda w: parse_suite('[[attack]]\nattack = "pgd"\neps = "8/255"\nstepz = 3\n'))),
    "suite-name": Case(
        "`--suite NAME`", "neither a built-in suite nor a file",
        "no built-in suite 'nonsense' and no such file; built-in suites: […]",
        api(lambda w: load_suite("nonsense"))),
    # ---------------------------------------------------------------- other options
    "model-name": Case(
        "`create_model(name)`", "an unknown architecture",
        "unknown model 'resnet1000' (did you mean 'resnet18'?); available: compact, …, or "
        "robustbench:NAME, timm:NAME, torchvision:NAME",
        api(lambda w: create_model("resnet1000"))),
    "defense-name": Case(
        "`train --defense`", "an unknown training recipe",
        "unknown defense 'nonsense'; choose one of […]",
        cli("train", "--defense", "nonsense")),
    "defense-option": Case(
        "`train --defense-option`", "an option the recipe does not have",
        "bad option 'lamb=1': expected KEY=VALUE with KEY one of […]",
        cli("train", "--defense", "fgr", "--defense-option", "lamb=1")),
    "defense-option-value": Case(
        "`train --defense-option`", "a value of the wrong type",
        "option lam needs a float, got 'big'",
        cli("train", "--defense", "fgr", "--defense-option", "lam=big")),
    "gcm-without-suite": Case(
        "`evaluate --gcm`", "without `--suite`",
        "--gcm needs --suite (e.g. --suite adaptive); clean accuracy is unchanged by GCM by "
        "construction and is reported by every suite",
        cli("evaluate", "--checkpoint", "{checkpoint}", "--gcm", "front")),
    # ---------------------------------------------------------------- results files
    "results-other-run": Case(
        "`evaluate --suite ... --db`, `run_suite(..., db)`",
        "the results file of another run (other seed, model, data ...)",
        "… holds results of a different run (seed: file has 0, this run has 1). It was not modified: "
        "pass another --db for this run, or delete the file to start over",
        api(_other_run)),
    "results-corrupt": Case(
        "`evaluate --suite ... --db`, `report`", "a corrupt results file (not SQLite)",
        "… is not a readable gradshield results file (file is not a database); it may be corrupt or "
        "another kind of file. It was not modified: move it away or pass another --db",
        cli("report", "{garbage_db}", "--out", "{root}/report")),
    "results-foreign-sqlite": Case(
        "`evaluate --suite ... --db`, `report`", "an SQLite file of another program",
        "… is an SQLite file but not a gradshield results file (no 'meta' table); it was not touched. "
        "Pass another --db path",
        cli("report", "{foreign_db}", "--out", "{root}/report")),
    "results-missing": Case(
        "`report`", "a results file that does not exist",
        "results file not found: …; run `gradshield evaluate --suite ...`",
        cli("report", "{root}/none.db", "--out", "{root}/report")),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Every bad (and good) file the cases need, made once in a temporary folder."""
    root = tmp_path_factory.mktemp("bad-inputs")
    w = SimpleNamespace(root=root)
    w.checkpoint = tiny_checkpoint(root / "digits.pt")
    w.model = create_model("compact", width=0.25).eval()
    torch.manual_seed(0)
    w.x, w.y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    from gradshield.checkpoint import load_model

    w.loaded = load_model(w.checkpoint)[0]
    w.empty = root / "empty.pt"
    w.empty.write_bytes(b"")
    w.truncated = root / "truncated.pt"
    w.truncated.write_bytes(w.checkpoint.read_bytes()[: w.checkpoint.stat().st_size // 3])
    w.malicious = write_malicious(root / "malicious.pt", root / "PWNED")
    w.html = root / "page.pt"
    w.html.write_bytes(HTML_PAGE)
    w.lfs = root / "lfs.pt"
    w.lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 123456\n")
    w.foreign = root / "foreign.pt"
    torch.save(create_model("compact", width=0.25).state_dict(), w.foreign)
    blob = read_checkpoint(w.checkpoint)
    w.newer = root / "newer.pt"
    torch.save({**blob, "version": 99}, w.newer)
    w.lying = save_checkpoint(root / "lying.pt", {
        **{k: v for k, v in blob.items() if k not in ("format", "version")},
        "model_config": {**blob["model_config"], "width": 1.0}})
    w.digits = image_folder(root / "digits-data", DIGITS, per_class=1)
    w.cifarlike = image_folder(root / "cifar-like", CIFAR10_CLASSES, per_class=1)
    w.three = image_folder(root / "three", ("0", "1", "2"), per_class=1)
    w.mixed = image_folder(root / "mixed", ("a", "b"), per_class=1)
    w.tv_weights = root / "resnet18.pth"
    torch.save(create_model("torchvision:resnet18", num_classes=2).net.state_dict(), w.tv_weights)
    w.flat_imagenet = root / "flat-imagenet"
    (w.flat_imagenet / "val").mkdir(parents=True)
    for i in range(2):
        (w.flat_imagenet / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(png(i))
    (w.mixed / "train" / "a" / "big.png").write_bytes(png(5, (40, 40)))
    w.cache = root / "cache"
    w.archive = image_archive(root / "archive" / "cifar10-jpeg.tar.gz")
    load_archive(w.archive, w.cache)
    for cached in w.cache.glob("*.pt"):
        write_malicious(cached, root / "PWNED", shape="bare")
    w.corrupt_dir = root / "corrupt"
    w.corrupt_dir.mkdir()
    (w.corrupt_dir / "cifar10-jpeg.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 20)
    w.bad_attack_suite = root / "bad.toml"
    w.bad_attack_suite.write_text('[[attack]]\nattack = "pgdd"\neps = "8/255"\n')
    w.garbage_db = root / "garbage.db"
    w.garbage_db.write_bytes(b"this is not a database" * 100)
    w.foreign_db = root / "foreign.db"
    with sqlite3.connect(w.foreign_db) as conn:
        conn.execute("CREATE TABLE notes(text TEXT)")
    yield w
    assert not (root / "PWNED").exists()


def pattern(message: str) -> re.Pattern:
    """The documented message as a regular expression: ``…`` matches anything."""
    return re.compile(".*?".join(re.escape(part) for part in message.split("…")), re.DOTALL)


@pytest.mark.parametrize("key", list(CASES))
def test_bad_input_gets_the_documented_error(key, world):
    case = CASES[key]
    message = case.trigger(world)
    assert pattern(case.message).fullmatch(message), f"\ndocumented: {case.message}\nactual:     {message}"


def _cell(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def table() -> str:
    """The Markdown table of docs/errors.md, from ``CASES``."""
    rows = ["| # | where | bad input | error message (… varies) |", "|---|---|---|---|"]
    for i, case in enumerate(CASES.values(), 1):
        bad = case.bad_input if "`" in case.bad_input else _cell(case.bad_input)
        rows.append(f"| {i} | {case.where} | {bad} | {_cell(case.message)} |")
    return "\n".join(rows)


def _with_table(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def test_docs_table_is_generated_from_these_cases():
    text = DOC.read_text()
    assert BEGIN in text and END in text
    assert text == _with_table(text), "docs/errors.md is stale: run `python -m tests.test_bad_inputs`"
    assert len(CASES) >= 20


if __name__ == "__main__":
    DOC.write_text(_with_table(DOC.read_text()))
    print(f"wrote {len(CASES)} rows to {DOC}", file=sys.stderr)
