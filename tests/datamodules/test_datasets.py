"""The dataset DataModules on small files in their real formats: shapes, labels, class names, a fit, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import pytest
import torch

from datamodules import (
    CatsVsDogsDataModule,
    CIFAR10DataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    PetExpressionsDataModule,
)
from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError
from datamodules.images import BadSample
from lightning_modules.backbones.backbone import data_config_dict
from lightning_modules.module import FineTuneModule
from tests.helpers.data import image_exif, photo, write_cifar, write_class_folders, write_mnist
from tests.helpers.models import quiet_trainer

SIZE = 32


def _config(in_chans: int = 3) -> dict[str, Any]:
    return data_config_dict("timm/test_resnet", "none", SIZE, in_chans)


def _fit_fast(dm: ImageClassificationDataModule, tmp_path: Path, in_chans: int = 3, **kw: Any) -> pl.Trainer:
    model = FineTuneModule(
        backbone="timm/test_resnet", weights="none", image_size=SIZE, in_chans=in_chans, num_classes=dm.num_classes
    )
    trainer = quiet_trainer(tmp_path, fast_dev_run=True, **kw)
    trainer.fit(model, datamodule=dm)
    return trainer


def _labels(dm: ImageClassificationDataModule, split: str) -> list[int]:
    return [int(dm.datasets[split][i][1]) for i in range(len(dm.datasets[split]))]  # type: ignore[arg-type]


def _check_batch(dm: ImageClassificationDataModule, channels: int = 3) -> None:
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    x, y = batch.inputs, batch.targets
    assert batch.split == "train" and not batch.features
    assert x.shape[1:] == (channels, SIZE, SIZE) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.max()) < dm.num_classes


# ------------------------------------------------------------------------------------------- image folders


def test_image_folder_by_ratio(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "imgs", {"Sad": 10, "happy": 10, "Angry": 10})
    dm = ImageFolderDataModule(
        root=str(tmp_path / "imgs"),
        batch_size=4,
        num_workers=0,
        data_config=_config(),
        val_fraction=0.2,
        test_fraction=0.2,
    )
    assert dm.class_names == ["Angry", "happy", "Sad"]  # case-insensitive order
    _check_batch(dm)
    assert {s: len(dm.datasets[s]) for s in ("train", "val", "test")} == {
        "train": 19,
        "val": 5,
        "test": 6,
    }  # val: 20% of the 24 left after test
    _fit_fast(dm, tmp_path)


def test_image_folder_with_split_folders_and_mixed_casing(tmp_path: Path) -> None:
    root = tmp_path / "split"
    seed = write_class_folders(root / "train", {"cat": 6, "dog": 6})
    seed = write_class_folders(root / "valid", {"Cat": 2, "DOG": 2}, start=seed)
    write_class_folders(root / "test", {"cat": 3, "dog": 3}, start=seed)
    dm = ImageFolderDataModule(root=str(root), batch_size=4, num_workers=0, data_config=_config())
    dm.setup()
    assert dm.class_names == ["cat", "dog"]
    assert sorted(_labels(dm, "val")) == [0, 0, 1, 1] and sorted(_labels(dm, "test")) == [0, 0, 0, 1, 1, 1]
    assert len(dm.datasets["train"]) == 12


def test_planted_faults_are_converted_or_reported_never_replaced(
    tmp_path: Path, faulty_folder: tuple[Path, dict[str, str]]
) -> None:
    root, fates = faulty_folder
    dm = ImageFolderDataModule(
        root=str(root),
        batch_size=5,
        num_workers=0,
        data_config=_config(),
        val_fraction=0.25,
        test_fraction=0.25,
        augment="none",
    )
    dm.setup()
    good = 12 + sum(f == "good" for f in fates.values())
    scanned_out = {Path(p).name for _, p, _ in dm.skipped}
    assert scanned_out == {"zero.jpg", "not_an_image.jpg"}  # caught by the header check at scan time
    assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == good + 1  # + the truncated JPEG
    seen: list[str] = []
    for split in ("train", "val", "test"):
        loader = getattr(dm, f"{split}_dataloader")()
        for batch in loader:
            batch = dm.on_before_batch_transfer(batch, 0)
            assert batch.inputs.shape[1:] == (3, SIZE, SIZE) and len(batch.indices) == len(batch.inputs)
            seen += [Path(dm.datasets[split].name(i)).name for i in batch.indices.tolist()]
    decodable = [f"img_{i}.jpg" for i in range(12)] + [name for name, fate in fates.items() if fate == "good"]
    assert len(seen) == good and sorted(seen) == sorted(decodable)  # each decodable file once: no duplicate, no drop
    reasons = {Path(p).name: r for _, p, r in dm.skipped}
    assert set(reasons) == {"zero.jpg", "not_an_image.jpg", "truncated.jpg"}
    assert "empty file" in reasons["zero.jpg"] and "truncated" in reasons["truncated.jpg"]
    files: Any = dm.datasets["train"].dataset
    while not hasattr(files, "paths"):
        files = files.dataset
    all_paths = list(files.paths)
    assert len(all_paths) == len(set(all_paths)) == good + 1
    assert not any(".ipynb_checkpoints" in p or p.endswith(("Thumbs.db", ".DS_Store")) for p in all_paths)


@pytest.mark.slow
def test_bad_image_report_is_written_to_the_run_directory(
    tmp_path: Path, faulty_folder: tuple[Path, dict[str, str]]
) -> None:
    root, _ = faulty_folder
    dm = ImageFolderDataModule(
        root=str(root), batch_size=32, num_workers=0, data_config=_config(), val_fraction=0.25, test_fraction=0.25
    )
    model = FineTuneModule(backbone="timm/test_resnet", weights="none", image_size=SIZE, num_classes=2)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(tmp_path, max_epochs=1, logger=logger)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    report = (Path(str(trainer.log_dir)) / "bad_images.csv").read_text().splitlines()
    assert report[0] == "split,path,reason"
    assert sorted(Path(line.split(",")[1]).name for line in report[1:]) == [
        "not_an_image.jpg",
        "truncated.jpg",
        "zero.jpg",
    ]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    import numpy as np

    from datamodules.images import load_image, read_rgb

    img = photo(7, size=(40, 20))
    exif = image_exif(orientation=6)  # rotate 90 degrees on display
    img.save(tmp_path / "rotated.jpg", exif=exif)
    slow = read_rgb(tmp_path / "rotated.jpg")
    fast = load_image(tmp_path / "rotated.jpg")  # the torchvision decoder
    assert isinstance(fast, torch.Tensor)
    assert slow.size == (20, 40) and tuple(fast.shape) == (3, 40, 20)
    # both libjpeg decoders: the same pixels within rounding of the upsampled chroma
    assert np.abs(np.asarray(slow, dtype=int) - fast.permute(1, 2, 0).numpy().astype(int)).mean() < 2


def test_fast_jpeg_path_falls_back_to_pil_for_cmyk_and_truncated_files(tmp_path: Path) -> None:
    from datamodules.images import load_image

    photo(3, mode="CMYK").save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"  # PIL converted it
    photo(4).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_image(tmp_path / "cut.jpg")


def test_an_empty_class_folder_is_an_error_unless_class_names_leave_it_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_class_folders(tmp_path / "imgs", {"cat": 4, "dog": 4})
    (tmp_path / "imgs" / "Zebra").mkdir()
    implicit = ImageFolderDataModule(root=str(tmp_path / "imgs"), num_workers=0, data_config=_config())
    with pytest.raises(ConfigError, match=r"imgs has class folders without images: \['Zebra'\]"):
        implicit.setup()
    named = ImageFolderDataModule(
        root=str(tmp_path / "imgs"), class_names=["cat", "dog"], num_workers=0, data_config=_config()
    )
    with caplog.at_level("INFO"):
        named.setup()
    assert "empty folders ['Zebra'] left out (not in data.init_args.class_names)" in caplog.text
    assert named.num_classes == 2 and len(named.datasets["train"]) + len(named.datasets["test"]) > 0


def test_missing_image_folder_error_names_the_path(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(root=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(ConfigError, match=r"image folder not found at .*nowhere\. Put images in"):
        dm.setup()


# ------------------------------------------------------------------------------------------- pet expressions


@pytest.mark.slow
def test_pet_expressions_layout_and_stable_class_map(tmp_path: Path) -> None:
    master = tmp_path / "pets" / "Master Folder"
    seed = write_class_folders(master / "train", {"Angry": 3, "happy": 3, "Sad": 3, "Other": 3})
    seed = write_class_folders(master / "valid", {"Angry": 1, "happy": 1, "Sad": 1, "Other": 1}, start=seed)
    write_class_folders(master / "test", {"angry": 1, "Happy": 1, "sad": 1, "other": 1}, start=seed)
    dm = PetExpressionsDataModule(
        root=str(tmp_path / "pets"), download=False, batch_size=4, num_workers=0, data_config=_config()
    )
    assert dm.class_names == ["angry", "happy", "other", "sad"]
    _check_batch(dm)
    train_files: Any = dm.datasets["train"].dataset
    for path, label in zip(train_files.paths, train_files.targets, strict=True):
        assert Path(path).parent.name.lower() == dm.class_names[label]
    assert sorted(_labels(dm, "test")) == [0, 1, 2, 3]
    _fit_fast(dm, tmp_path)


def test_pet_expressions_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    dm = PetExpressionsDataModule(root=str(tmp_path / "none"), download=False, num_workers=0)
    with pytest.raises(ConfigError, match=r"not found at .*none\. Download the Kaggle dataset anshtanwar"):
        dm.setup()


# ------------------------------------------------------------------------------------------- cats vs dogs


def _hf_dataset(n: int = 12) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Dataset.from_dict(
        {"image": [photo(i) for i in range(n)], "labels": [i % 2 for i in range(n)]}, features=features
    )


@pytest.mark.slow
@pytest.mark.parametrize("source", ["petimages", "save_to_disk", "parquet"])
def test_cats_vs_dogs_offline_sources(tmp_path: Path, source: str) -> None:
    root = tmp_path / source
    if source == "petimages":
        write_class_folders(root / "PetImages", {"Cat": 6, "Dog": 6})
        (root / "PetImages" / "Cat" / "666.jpg").write_bytes(b"")  # the real set's famous empty file
    elif source == "save_to_disk":
        _hf_dataset().save_to_disk(str(root))
    else:
        (root / "data").mkdir(parents=True)
        _hf_dataset().to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    dm = CatsVsDogsDataModule(
        root=str(root), batch_size=4, num_workers=0, data_config=_config(), test_fraction=0.2, val_fraction=0.25
    )
    _check_batch(dm)
    assert dm.class_names == ["cat", "dog"]
    sizes = {s: len(dm.datasets[s]) for s in ("train", "val", "test")}  # type: ignore[arg-type]
    assert sum(sizes.values()) == 12 and sizes["test"] == 3
    assert sorted(_labels(dm, "train") + _labels(dm, "val") + _labels(dm, "test")) == [0] * 6 + [1] * 6
    if source == "petimages":
        assert [Path(p).name for _, p, _ in dm.skipped] == ["666.jpg"]
    _fit_fast(dm, tmp_path)


def test_cats_vs_dogs_missing_data(tmp_path: Path) -> None:
    dm = CatsVsDogsDataModule(root=str(tmp_path / "absent"), num_workers=0)
    with pytest.raises(ConfigError, match=r"not found at .*absent\. Put the data on this machine"):
        dm.setup()


# ------------------------------------------------------------------------------------------- CIFAR-10 and MNIST


def test_cifar10_from_python_pickles(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, batch_size=8, num_workers=0, data_config=_config())
    _check_batch(dm)
    assert len(dm.datasets["test"]) == 20 and len(dm.datasets["train"]) + len(dm.datasets["val"]) == 40
    assert sorted(_labels(dm, "test")) == sorted(i % 10 for i in range(20))
    assert dm.class_names[0] == "airplane" and dm.num_classes == 10
    _fit_fast(dm, tmp_path)


def test_cifar10_missing(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(ConfigError, match=r"CIFAR-10 not found at .*cifar-10-batches-py.*extract it into"):
        dm.setup()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path, gz=gz)
    dm = MNISTDataModule(root=str(tmp_path), download=False, batch_size=8, num_workers=0, data_config=_config(1))
    _check_batch(dm, channels=1)
    assert len(dm.datasets["val"]) == 10 and len(dm.datasets["train"]) == 40  # 80/20 of 50
    assert sorted(_labels(dm, "test")) == sorted(i % 10 for i in range(20))
    _fit_fast(dm, tmp_path, in_chans=1)
    three = MNISTDataModule(root=str(tmp_path), download=False, batch_size=8, num_workers=0, data_config=_config(3))
    _check_batch(three, channels=3)


def test_mnist_missing_and_truncated(tmp_path: Path) -> None:
    dm = MNISTDataModule(root=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(ConfigError, match=r"MNIST file train-images-idx3-ubyte\[\.gz\] not found"):
        dm.setup()
    raw = write_mnist(tmp_path, gz=False)
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(ConfigError, match="is truncated"):
        MNISTDataModule(root=str(tmp_path), download=False, num_workers=0).setup()


# ------------------------------------------------------------------------------------------- transforms, loaders


def test_val_carved_from_train_uses_eval_transforms(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "imgs", {"a": 8, "b": 8})
    dm = ImageFolderDataModule(
        root=str(tmp_path / "imgs"),
        num_workers=0,
        data_config=_config(),
        augment="trivialaugment",
        val_fraction=0.25,
        test_fraction=0.25,
    )
    dm.setup()
    val_a: Any = dm.datasets["val"][0][0]
    val_b: Any = dm.datasets["val"][0][0]
    assert isinstance(val_a, torch.Tensor) and torch.equal(val_a, val_b)
    torch.manual_seed(0)
    train_draws: list[Any] = [dm.datasets["train"][0][0] for _ in range(4)]
    assert any(not torch.equal(train_draws[0], t) for t in train_draws[1:])  # random augmentation


@pytest.mark.parametrize("preset", ["none", "basic", "affine", "notebook", "randaugment", "trivialaugment"])
def test_every_augmentation_preset_keeps_the_input_size(preset: str) -> None:
    from datamodules.common import DataConfig
    from datamodules.transforms import train_transform

    out = train_transform(DataConfig.from_dict(_config()), preset)(photo(3, size=(50, 70)))
    assert out.shape == (3, SIZE, SIZE)


def test_unknown_augmentation_preset_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.augment .fancy. is not a preset; choose one of"):
        ImageFolderDataModule(root="anywhere", augment="fancy")


def test_loader_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_class_folders(tmp_path / "imgs", {"a": 4, "b": 4})
    kwargs: dict[str, Any] = {
        "root": str(tmp_path / "imgs"),
        "data_config": _config(),
        "val_fraction": 0.25,
        "test_fraction": 0.25,
    }
    for cpus, workers in ((2, 2), (64, 8), (1, 1)):  # the cores this process may use (its affinity), at most 8
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, cpus=cpus: set(range(cpus)))
        assert ImageFolderDataModule(**kwargs).num_workers == workers
    monkeypatch.delattr("os.sched_getaffinity")  # a platform without affinity: the CPU count
    for count, workers in ((4, 4), (None, 1)):
        monkeypatch.setattr("os.cpu_count", lambda count=count: count)
        assert ImageFolderDataModule(**kwargs).num_workers == workers
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert ImageFolderDataModule(**kwargs).pin_memory is True
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    dm = ImageFolderDataModule(**kwargs, num_workers=1)
    assert dm.pin_memory is False
    dm.setup()
    assert dm.train_dataloader().persistent_workers is True


def test_split_fractions_are_checked_with_their_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.init_args\.val_fraction is 1\.5: allowed \(0, 1\)"):
        ImageFolderDataModule(root="anywhere", val_fraction=1.5)


def test_the_header_check_at_setup_shows_its_progress_unless_the_progress_bar_is_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_class_folders(tmp_path, {"cat": 6, "dog": 6})  # one folder, val and test carved: one check of 12 files

    def checked(bar: bool | None) -> list[str]:
        """The progress lines of the check, with a trainer whose progress bar is on or off, or none (None)."""
        dm = ImageFolderDataModule(root=str(tmp_path), batch_size=4, num_workers=0, data_config=_config())
        capsys.readouterr()
        if bar is None:
            dm.setup("fit")  # by hand, as in a notebook
        else:
            _fit_fast(dm, tmp_path, enable_progress_bar=bar)
        lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
        return [line for line in lines if line.startswith("checking image files")]

    for bar in (True, None):
        assert any("100%" in line and "12/12 [" in line and "file/s]" in line for line in checked(bar)), bar
    assert checked(False) == []


def test_folders_read_symlinked_subfolders_unicode_names_and_phone_formats(tmp_path: Path) -> None:
    """A symlinked folder inside a class is read (once, even when it links back up); `Café crème` written
    decomposed (NFD, as macOS archives do) in val is the class typed composed (NFC) in train; HEIC, AVIF and JFIF
    photos are read; every other file is counted by extension in the data summary."""
    import unicodedata

    name = "Café crème"
    nfd = unicodedata.normalize("NFD", name)
    assert nfd != name
    write_class_folders(tmp_path / "root" / "train", {name: 4, "tea": 4})
    write_class_folders(tmp_path / "root" / "val", {nfd: 2, "tea": 2})
    write_class_folders(tmp_path / "root" / "test", {name: 2, "tea": 2})
    write_class_folders(tmp_path / "elsewhere", {"more": 3})
    tea = tmp_path / "root" / "train" / "tea"
    (tea / "linked").symlink_to(tmp_path / "elsewhere" / "more")  # a symlinked folder of 3 more tea images
    (tea / "up").symlink_to(tea)  # a link back up: not a loop, not read twice
    for ext, fmt in ((".heic", "HEIF"), (".avif", "AVIF"), (".jfif", "JPEG")):
        photo(7, (40, 30)).save(tea / f"phone{ext}", format=fmt)
    (tea / "notes.txt").write_text("not an image")
    (tea / "Thumbs.db").write_bytes(b"\0" * 10)
    dm = ImageFolderDataModule(root=str(tmp_path / "root"), num_workers=0, data_config=_config(), batch_size=4)
    dm.setup("fit")
    assert dm.class_names == [name, "tea"]
    assert dm.split_sizes() == {"train": 4 + 4 + 3 + 3, "val": 4, "test": 4}
    assert sorted(dm.datasets["val"].dataset.targets) == [0, 0, 1, 1]  # the NFD folder is class 0
    files = [Path(f).relative_to(tmp_path / "root") for f in dm.datasets["train"].dataset.files() or []]
    assert sum(f.stem == "phone" for f in files) == 3 and not dm.skipped  # all three decode (header check passed)
    assert sum("linked" in f.parts for f in files) == 3 and not any("up" in f.parts for f in files)
    for index in range(len(files)):
        assert not isinstance(dm.datasets["train"].dataset[index][0], BadSample)
    assert "Not images: 2 file(s) left out for their extension (1 .db, 1 .txt)" in dm.describe()
