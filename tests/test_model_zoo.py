"""Real models at real scale, offline: ImageNet-layout folders streamed batch by batch, torchvision /
timm / RobustBench models by name with local weights (random init here), through `gradshield
evaluate` with GCM, BPDA and the report; CIFAR-100 in torchvision's layout; no network access.

Speed: the synthetic ImageNet folder has 3 classes x 4 JPEGs of different sizes; the CNN is
torchvision's ResNet-18 evaluated at 64x64 and the transformer timm's DeiT-S (the real
architecture) built for 32x32 inputs (2x2 patches of 16 px), so each runs in seconds on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradshield.cli import main
from gradshield.data import (
    FileExamples,
    Preprocess,
    TensorExamples,
    image_folder_split,
    load_dataset,
    preprocess_for,
    take,
)
from gradshield.errors import GradshieldError
from gradshield.evaluation import load_run, parse_suite, run_suite
from gradshield.models import create_model, model_config
from tests._bad_files import image_folder

SUITE = ('name = "tiny"\n[[attack]]\nattack = "fgsm"\neps = "8/255"\n'
         '[[attack]]\nattack = "pgd"\neps = "8/255"\nsteps = 2\n'
         '[[attack]]\nattack = "pgd"\neps = "8/255"\nsteps = 2\nthrough = "bpda"\n')
SIZES = [(80, 60), (50, 90), (64, 64), (120, 70)]  # (W, H): landscape, portrait, square, wide


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection (urllib, requests, the hub) fails the test
    (local AF_UNIX sockets, which DataLoader workers use to pass tensors, stay allowed)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    connect = socket.socket.connect

    def local_only(self, address):
        if self.family not in (socket.AF_INET, socket.AF_INET6):
            return connect(self, address)
        return refuse(address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def imagenet_folder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = SIZES[i % len(SIZES)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def inet(tmp_path_factory) -> Path:
    return imagenet_folder(tmp_path_factory.mktemp("imagenet"))


# --------------------------------------------------------------------------- data


def test_streamed_folder_decodes_each_image_as_the_model_expects(inet):
    pre = Preprocess(crop=(48, 48), resize=56, interpolation="bicubic")
    files = image_folder_split(inet, "val", pre, workers=1)
    assert len(files) == 12 and files.classes == ("n00000000", "n00000001", "n00000002")
    assert files.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and files.image_shape == (3, 48, 48)
    batches = list(files.batches([(0, 5), (5, 12), (3, 4)]))
    assert [b.shape[0] for b in batches] == [5, 7, 1]
    every = torch.cat(batches[:2])
    assert every.dtype == torch.float32 and every.min() >= 0 and every.max() <= 1
    for i in (0, 5, 11):  # each image: PIL resize of the shorter side, center crop, /255
        with Image.open(inet / "val" / files.files[i]) as image:
            assert torch.equal(every[i], pre(image).float() / 255)
    assert torch.equal(batches[2][0], every[3])
    in_process = FileExamples(files.folder, files.files, files.labels, files.classes, pre, workers=0)
    assert torch.equal(take(in_process, 0, 12), every)


def test_fingerprint_names_files_sizes_labels_and_transform_not_pixels(inet, tmp_path):
    import shutil

    pre = Preprocess(crop=(32, 32), resize=40)
    files = image_folder_split(inet, "val", pre)
    moved = shutil.copytree(inet, tmp_path / "moved")
    assert image_folder_split(moved, "val", pre).fingerprint == files.fingerprint
    assert image_folder_split(inet, "val", Preprocess(crop=(32, 32), resize=48)).fingerprint \
        != files.fingerprint
    assert files.subset(5, seed=0).fingerprint != files.fingerprint
    with open(moved / "val" / files.files[0], "ab") as handle:
        handle.write(b"\0")
    assert image_folder_split(moved, "val", pre).fingerprint != files.fingerprint


def test_seeded_subsets_and_per_class_choice(inet):
    files = image_folder_split(inet, "val", Preprocess(crop=(32, 32), resize=32))
    a, b = files.subset(5, seed=3), files.subset(5, seed=3)
    assert a.files == b.files and len(a) == 5 and list(a.files) == sorted(a.files)
    assert files.subset(5, seed=4).files != a.files
    two = files.per_class(2, seed=1)
    assert two.labels.tolist() == [0, 0, 1, 1, 2, 2] and two.files == files.per_class(2, seed=1).files
    assert len(files.per_class(10, seed=0)) == 12  # a class with fewer gives all it has


def test_preprocessing_comes_from_the_model():
    tv = preprocess_for(model_config("torchvision:resnet50.IMAGENET1K_V1"))
    assert (tv.crop, tv.resize, tv.interpolation) == ((224, 224), 256, "bilinear")
    deit = preprocess_for(model_config("timm:deit_small_patch16_224"))
    assert (deit.crop, deit.resize, deit.interpolation) == ((224, 224), 248, "bicubic")  # 224/0.9
    small = model_config("timm:deit_small_patch16_224", input_size=(112, 112))
    assert preprocess_for(small).resize == 124  # the resize scales with the crop
    assert preprocess_for(model_config("torchvision:resnet50"), (64, 64)).crop == (64, 64)


def test_run_suite_on_streamed_files_equals_run_on_the_same_tensors(inet, tmp_path):
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", num_classes=3, input_size=(32, 32)).eval()
    files = image_folder_split(inet, "val", Preprocess(crop=(32, 32), resize=36), workers=1)
    x = take(files, 0, len(files))
    suite = parse_suite(SUITE)
    streamed = run_suite(model, files, None, suite, tmp_path / "s.db", batch_size=5, progress="none",
                         gradient_figure=False)
    in_memory = run_suite(model, x, files.labels, suite, tmp_path / "t.db", batch_size=5,
                          progress="none", gradient_figure=False)
    a, b = load_run(tmp_path / "s.db"), load_run(tmp_path / "t.db")
    assert np.array_equal(a.success, b.success) and np.array_equal(a.clean_correct, b.clean_correct)
    assert a.meta["data_fingerprint"] == files.fingerprint
    assert b.meta["data_fingerprint"] == TensorExamples(x, files.labels).fingerprint
    assert a.meta["data"]["dataset"] == "imagenet" and a.meta["classes"] == list(files.classes)
    assert in_memory["examples"] == streamed["examples"] == 12
    again = run_suite(model, files, None, suite, tmp_path / "s.db", batch_size=5, progress="none")
    assert again["batches_done"] == streamed["batches_done"]  # resumed: nothing left to do
    with pytest.raises(GradshieldError, match="different run"):
        run_suite(model, files.subset(6), None, suite, tmp_path / "s.db", batch_size=5,
                  progress="none")


def test_cifar100_in_torchvisions_layout(tmp_path, monkeypatch):
    """A fake cifar-100-python folder (torchvision checks the real files' md5: off for a fake)."""
    from torchvision.datasets import CIFAR100

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"class{i:02d}" for i in range(100)]
    for split, n in (("train", 200), ("test", 300)):
        blob = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "fine_labels": [i % 100 for i in range(n)], "coarse_labels": [0] * n}
        (folder / split).write_bytes(pickle.dumps(blob))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    from torchvision.datasets import cifar

    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    train, test = load_dataset("cifar100", tmp_path)
    assert train.num_classes == test.num_classes == 100 and test.classes[7] == "class07"
    assert test.image_shape == (3, 32, 32) and len(test.per_class(2, seed=0)) == 200
    weights = tmp_path / "r18.pth"
    torch.save(create_model("torchvision:resnet18", num_classes=100).net.state_dict(), weights)
    out = _cli_ok(["evaluate", "--model", "torchvision:resnet18", "--weights", weights,
                   "--dataset", "cifar100", "--data-dir", tmp_path, "--per-class", 1,
                   "--test-limit", 10])
    assert out["examples"] == 10 and out["arch"] == "torchvision:resnet18"


def _cli_ok(argv) -> dict:
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    assert code == 0, stderr.getvalue()[-3000:]
    return json.loads(stdout.getvalue().strip().splitlines()[-1])


# --------------------------------------------------------------------------- models through the CLI


def _evaluate_with_gcm_and_report(tmp_path, model, weights, data_args, size) -> dict:
    """`gradshield evaluate --model --weights --gcm front` with a suite holding a BPDA entry, then
    `gradshield report` on its results file."""
    (tmp_path / "suite.toml").write_text(SUITE)
    db = tmp_path / "gcm.db"
    out = _cli_ok(["evaluate", "--model", model, "--weights", weights, *data_args, "--suite",
                   tmp_path / "suite.toml", "--db", db, "--progress", "none", "--batch-size", 6,
                   "--workers", 1, "--samples", 1, "--gcm", "front",
                   *(["--image-size", size, size] if size else [])])
    assert out["status"] == "complete" and set(out["robust_accuracy"]) == {
        "fgsm-linf-8/255", "pgd-linf-8/255", "pgd-linf-8/255-bpda"}
    report = _cli_ok(["report", db, "--out", tmp_path / "report"])
    assert "pgd-linf-8/255-bpda" in Path(report["markdown"]).read_text()
    assert Path(report["html"]).is_file()
    meta = load_run(db).meta
    assert meta["gcm"]["at"] == "front" and "placements=[front]" in meta["model"]
    assert meta["weights"] == str(weights) and meta["model_name"] == model
    return out


def test_torchvision_cnn_on_an_imagenet_folder_with_gcm_bpda_and_report(inet, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(create_model("torchvision:resnet18", num_classes=3).net.state_dict(), weights)
    out = _evaluate_with_gcm_and_report(tmp_path, "torchvision:resnet18", weights,
                                        ["--dataset", "imagenet", "--data-dir", inet], 48)
    assert out["examples"] == 12
    meta = load_run(tmp_path / "gcm.db").meta  # resnet18's resize 256 for a 224 crop, scaled
    assert meta["image_shape"] == [3, 48, 48] and meta["data"]["preprocess"]["resize"] == 55


def test_timm_transformer_from_safetensors_on_an_imagenet_folder(inet, tmp_path):
    pytest.importorskip("timm", reason="timm is the optional extra gradshield[timm]")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model("timm:deit_small_patch16_224", num_classes=3, input_size=(32, 32))
    weights = tmp_path / "deit_s.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(weights))
    loaded = create_model("timm:deit_small_patch16_224", num_classes=3, input_size=(32, 32),
                          weights=weights)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    _evaluate_with_gcm_and_report(tmp_path, "timm:deit_small_patch16_224", weights,
                                  ["--dataset", "imagenet", "--data-dir", inet, "--per-class", 2],
                                  32)


def test_robustbench_architecture_from_its_model_dir_layout(tmp_path):
    import importlib.util

    if importlib.util.find_spec("robustbench") is None:  # (its __init__ does not import: see
        pytest.skip("robustbench is the optional extra gradshield[robustbench]")  # robustbench_zoo)
    name = "Sehwag2021Proxy_R18"  # a ResNet-18 entry: small enough for the CPU
    torch.manual_seed(0)
    model = create_model(f"robustbench:{name}")
    assert model.config.arch == f"robustbench:cifar10/Linf/{name}" and model.config.num_classes == 10
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.normalize(x), x)  # RobustBench models normalise inside themselves
    model_dir = tmp_path / "models"
    (model_dir / "cifar10" / "Linf").mkdir(parents=True)
    state = {f"module.{k}": v for k, v in model.net.state_dict().items()}  # as DataParallel saved it
    torch.save({"state_dict": state}, model_dir / "cifar10" / "Linf" / f"{name}.pt")
    loaded = create_model(f"robustbench:cifar10/Linf/{name}", weights=model_dir).eval()
    assert torch.equal(loaded(x), model.eval()(x))
    data = image_folder(tmp_path / "data", [f"c{i}" for i in range(10)], per_class=1,
                        splits=("train", "test"))
    _evaluate_with_gcm_and_report(tmp_path, f"robustbench:cifar10/Linf/{name}", model_dir,
                                  ["--dataset", "folder", "--data-dir", data], None)


@pytest.mark.parametrize("prefix", ["module.", "module.model.", ""])
def test_robustbench_imagenet_weights_load_by_its_prefix_rule(tmp_path, prefix):
    """RobustBench's ImageNet entries wrap a torchvision net in a normalising module (keys
    ``model.*``); files hold the bare net's keys, with or without ``module.``/``model.`` prefixes.
    Each layout loads to the same function (load_model's rule: strip both, re-add ``model.``)."""
    import importlib.util

    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("robustbench is the optional extra gradshield[robustbench]")
    name = "imagenet/Linf/Salman2020Do_R18"  # a ResNet-18 entry: small enough for the CPU
    torch.manual_seed(0)
    model = create_model(f"robustbench:{name}").eval()
    assert model.config.num_classes == 1000 and tuple(model.config.input_size) == (224, 224)
    bare = {k.removeprefix("model."): v for k, v in model.net.state_dict().items()
            if k.startswith("model.")}
    assert bare and "conv1.weight" in bare
    model_dir = tmp_path / "models"
    (model_dir / "imagenet" / "Linf").mkdir(parents=True)
    torch.save({f"{prefix}{k}": v for k, v in bare.items()},
               model_dir / "imagenet" / "Linf" / "Salman2020Do_R18.pt")
    torch.manual_seed(1)  # another random init: only the file can make the two equal
    loaded = create_model(f"robustbench:{name}", weights=model_dir).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_nothing_is_downloaded_and_pretrained_is_never_asked(monkeypatch):
    timm = pytest.importorskip("timm")
    seen = {}
    real = timm.create_model

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    create_model("timm:test_vit", num_classes=3)
    assert seen["pretrained"] is False
    create_model("torchvision:resnet18", num_classes=3)  # weights=None: the no_network fixture


def test_device_option_is_checked(tmp_path):
    from gradshield.cli import torch_device

    assert torch_device("cpu") == torch.device("cpu")
    with pytest.raises(GradshieldError, match="not a torch device"):
        torch_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(GradshieldError, match="sees no CUDA GPU"):
            torch_device("cuda")


def test_the_table_experiments_parse_with_models_by_name():
    from gradshield.evaluation.experiment import load_experiment

    repo = Path(__file__).resolve().parents[1]
    imagenet = load_experiment(repo / "experiments" / "gcm-imagenet.toml")
    assert imagenet.data == {"dataset": "imagenet", "per_class": 20}
    assert sum(1 for m in imagenet.models.values() if m.model) == 9
    assert {r.suite for r in imagenet.runs} == {"gcm-paper"}
    table2 = load_experiment(repo / "experiments" / "gcm-robustbench.toml")
    names = {m.model.rsplit("/", 1)[1] for m in table2.models.values() if m.model}
    assert len(names) == 9 and "Carmon2019Unlabeled" in names
    if importlib.util.find_spec("robustbench") is not None:  # each is an entry of RobustBench's zoo
        from gradshield.models.robustbench_zoo import _zoo

        zoo = _zoo()
        linf = zoo.models[zoo.enums.BenchmarkDataset("cifar10")][zoo.enums.ThreatModel("Linf")]
        assert names <= set(linf), names - set(linf)
    assert {(r.suite, r.through) for r in table2.runs} == {("gcm-table2", None), ("gcm-table2", "bpda")}


def test_timm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(GradshieldError, match=r"pip install 'gradshield\[timm\]'"):
        create_model("timm:deit_small_patch16_224")
