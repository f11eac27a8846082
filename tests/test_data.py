import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_unsup.data import DataError, ImageFolderDataModule, load_image, scan_folder
from mtl_unsup.data.datamodule import seeded_split
from mtl_unsup.data.digits import NUM_DIGITS, write_digits_folder

from .conftest import write_shapes


def make_dm(root: Path, **kw) -> ImageFolderDataModule:
    kw = {"channels": 1, "image_size": 16, "batch_size": 8, "eval_batch_size": 8, **kw}
    dm = ImageFolderDataModule(root=str(root), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_class_subfolders_give_labels_and_flat_folders_none(tmp_path):
    labelled = scan_folder(write_shapes(tmp_path / "a", per_class=3))
    assert labelled.classes == ("class_0", "class_1", "class_2")
    assert sorted(set(labelled.labels)) == [0, 1, 2] and len(labelled) == 9
    flat = scan_folder(write_shapes(tmp_path / "b", per_class=3, labelled=False))
    assert not flat.has_labels and set(flat.labels) == {-1}
    assert not scan_folder(tmp_path / "a", labels="none").has_labels


def test_missing_path_and_empty_folder_are_named(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*data\.root"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"No images found in {tmp_path / 'empty'}"):
        scan_folder(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="No images found"):
        scan_folder(tmp_path / "text")


def write_bad_files(folder: Path, late: bool = True) -> dict[str, Path]:
    """Files the header check finds (``zero``, ``text``, ``trunc_jpeg``, cut inside its header)
    and, with ``late``, files found only when decoded (``trunc``, ``late_jpeg``: pixel data cut)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"zero": folder / "zero.png", "text": folder / "text.jpg", "trunc": folder / "trunc.png"}
    files["zero"].write_bytes(b"")
    files["text"].write_text("this is not a JPEG")
    good = folder / "tmp_good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    files["trunc"].write_bytes(data[: len(data) // 2])
    good.unlink()
    jpeg = folder / "tmp_good.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    files["trunc_jpeg"] = folder / "trunc.jpg"
    files["trunc_jpeg"].write_bytes(jpeg.read_bytes()[:600])
    files["late_jpeg"] = folder / "late.jpg"
    files["late_jpeg"].write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size * 3 // 4])
    jpeg.unlink()
    if not late:
        files.pop("trunc").unlink()
        files.pop("late_jpeg").unlink()
    return files


def test_bad_files_are_found_before_training_and_skipped_with_one_warning(tmp_path):
    root = write_shapes(tmp_path / "data", per_class=10)
    bad = write_bad_files(root / "class_0")
    with pytest.warns(UserWarning, match="Skipping 3 unreadable") as record:
        dm = make_dm(root, val_fraction=0.0, test_fraction=0.0)
    message = str(record[0].message)  # the header check: no decoding at setup
    for name in ("zero", "text", "trunc_jpeg"):
        assert str(bad[name]) in message
    assert "0 bytes" in message and "not an image" in message and "truncated" in message
    assert str(bad["trunc"]) not in message and dm.num_train == 32


@pytest.mark.parametrize(("cache", "workers"), [("auto", 0), ("none", 1)])
def test_a_file_that_fails_only_when_decoded_is_skipped_and_named_never_a_crash(tmp_path, cache, workers,
                                                                                caplog):
    root = write_shapes(tmp_path / "data", per_class=10)
    bad = write_bad_files(root / "class_0")
    with pytest.warns(UserWarning, match="Skipping 3 unreadable"):
        dm = make_dm(root, val_fraction=0.0, test_fraction=0.0, cache=cache, num_workers=workers)
    late = {i for i, p in enumerate(dm.splits["train"].paths) if p in (bad["trunc"], bad["late_jpeg"])}
    assert len(late) == 2
    if cache == "auto":  # the cache decodes the split once and names what failed
        with pytest.warns(UserWarning, match="Skipping 2 image.*cannot be decoded") as record:
            loader = dm.train_dataloader()
        assert str(bad["trunc"]) in str(record[0].message)
    else:  # streamed: a loader worker meets them, names them and goes on
        loader = dm.train_dataloader()
    batches = list(loader)
    # each failed item is replaced by another of its batch: every batch keeps its size (under DDP
    # the ranks' batches must agree), and no blank image is trained on
    assert [len(b["index"]) for b in batches] == [8, 8, 8, 8]
    seen = torch.cat([b["index"] for b in batches])
    assert bool(torch.cat([b["valid"] for b in batches]).all()) and not late & set(seen.tolist())
    assert len(set(seen.tolist())) == 30
    evaluated = torch.cat([b["label"][~b["valid"]] for b in dm.split_loader("train")])
    assert evaluated.tolist() == [-1, -1]  # kept in place (aligned by index), out of the labelled scores


def test_a_split_none_of_whose_images_decode_is_an_error(tmp_path):
    root = tmp_path / "broken"
    bad = write_bad_files(root / "x")
    for name in ("zero", "text", "trunc_jpeg"):  # leave only files that fail when decoded
        bad[name].unlink()
    dm = make_dm(root, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError, match="None of the 2 images of the train set can be decoded"):
        dm.train_dataloader()


def test_bad_files_raise_when_asked(tmp_path):
    root = write_shapes(tmp_path / "data", per_class=4)
    bad = write_bad_files(root / "class_1")
    with pytest.raises(DataError, match="on_bad_image=skip") as err:
        make_dm(root, on_bad_image="raise", val_fraction=0.0, test_fraction=0.0)
    assert "5 unreadable" in str(err.value) and str(bad["late_jpeg"]) in str(err.value)


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda: Image.new("L", (10, 6), 128)),
        ("RGBA", lambda: Image.new("RGBA", (10, 6), (255, 0, 0, 0))),
        ("P", lambda: Image.new("RGB", (10, 6), (0, 255, 0)).convert("P")),
        ("CMYK", lambda: Image.new("CMYK", (10, 6), (0, 0, 0, 255))),
        ("I;16", lambda: Image.fromarray(np.linspace(0, 65535, 60).astype(np.uint16).reshape(6, 10))),
    ],
)
def test_every_image_mode_decodes_to_the_requested_channels(tmp_path, mode, make):
    path = tmp_path / f"img_{mode.replace(';', '')}.png" if mode != "CMYK" else tmp_path / "img.jpg"
    make().save(path)
    for channels, want in ((1, "L"), (3, "RGB")):
        img = load_image(path, channels)
        assert img.mode == want and img.size == (10, 6)
    if mode == "RGBA":  # fully transparent pixels are composited on white
        assert load_image(path, 3).getpixel((0, 0)) == (255, 255, 255)
    if mode == "I;16":  # 16-bit range is rescaled, not clipped to white
        arr = np.asarray(load_image(path, 1))
        assert arr.min() == 0 and arr.max() == 255 and 50 < np.median(arr) < 200


def test_split_subfolders_are_used_as_splits(tmp_path):
    write_shapes(tmp_path / "set" / "train", per_class=5)
    write_shapes(tmp_path / "set" / "test", per_class=2, seed=1)
    dm = make_dm(tmp_path / "set", val_fraction=0.2)
    # test comes from its folder; val, having none, is cut from train
    assert len(dm.splits["test"]) == 6 and len(dm.splits["val"]) == 3 and dm.num_train == 12
    assert dm.splits["train"].classes == ("class_0", "class_1", "class_2")
    assert dm.eval_splits() == ["test", "val", "train"]


def test_seeded_split_is_disjoint_complete_and_reproducible():
    parts = seeded_split(100, [0.1, 0.2], seed=3)
    assert [len(p) for p in parts] == [70, 10, 20]
    assert sorted(sum(parts, [])) == list(range(100))
    assert parts == seeded_split(100, [0.1, 0.2], seed=3) != seeded_split(100, [0.1, 0.2], seed=4)


def test_items_carry_their_index_and_plain_images(tmp_path):
    dm = make_dm(write_shapes(tmp_path / "d", per_class=6), val_fraction=0.0, test_fraction=0.0)
    loader = dm.cluster_dataloader()
    batch = next(iter(loader))
    assert torch.equal(batch["index"], torch.arange(8))
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    ds = loader.dataset  # the plain pass is the file itself, resized, in [0, 1]: no augmentation
    pixels = np.asarray(load_image(ds.images.paths[5], 1), dtype=np.float32) / 255.0
    assert torch.allclose(ds[5]["image"][0], torch.from_numpy(pixels), atol=1e-6)


def test_symlink_loop_does_not_hang(tmp_path):
    root = write_shapes(tmp_path / "loop", per_class=2)
    os.symlink(root, root / "class_0" / "again")
    assert len(scan_folder(root)) == 6


def test_digits_folder_is_written_once(tmp_path):
    root = write_digits_folder(tmp_path / "digits")
    files = sorted(root.glob("*/*.png"))
    assert len(files) == NUM_DIGITS and {p.parent.name for p in files} == {str(i) for i in range(10)}
    stamp = files[0].stat().st_mtime_ns
    write_digits_folder(root)
    assert files[0].stat().st_mtime_ns == stamp
    assert np.asarray(Image.open(files[0])).shape == (8, 8)


def test_digits_never_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by mtl-unsup"):
        write_digits_folder(tmp_path / "digits")
    assert (tmp_path / "digits" / "mine.txt").read_text() == "keep me"


def test_bad_data_settings_are_named():
    with pytest.raises(DataError, match="data.channels"):
        ImageFolderDataModule(root="x", channels=2)
    with pytest.raises(DataError, match="val_fraction"):
        ImageFolderDataModule(root="x", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(DataError, match="data.mean"):
        ImageFolderDataModule(root="x", channels=3, mean=[0.5, 0.5])
    with pytest.raises(DataError, match="data.cache='disk'"):
        ImageFolderDataModule(root="x", cache="disk")
    with pytest.raises(DataError, match="data.limit=1"):
        ImageFolderDataModule(root="x", limit=1)


@pytest.mark.parametrize("channels,invert", [(1, True), (3, False)])
def test_decoded_cache_serves_the_same_images_as_the_files(tmp_path, channels, invert):
    folder = write_shapes(tmp_path / "d", per_class=4)
    rng = np.random.default_rng(0)
    for i, size in enumerate([(13, 9), (40, 31), (5, 5)]):  # sizes that resizing must handle
        pixels = rng.integers(0, 256, (*size, 4), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGBA").save(folder / "class_1" / f"odd_{i}.png")
    kw = {"channels": channels, "invert": invert, "val_fraction": 0.2, "test_fraction": 0.2}
    cached, plain = make_dm(folder, cache="memory", **kw), make_dm(folder, cache="none", **kw)
    for split in ("train", "val", "test"):
        a, b = cached._dataset(split), plain._dataset(split)
        assert a.decoded is not None and b.decoded is None
        for i in range(len(a)):
            assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["label"] == b[i]["label"]
    index = torch.tensor([3, 0, 3, cached.num_train - 1])
    assert torch.equal(cached.train_images(index), plain.train_images(index))
    for a, b in zip(cached.cluster_dataloader(), plain.cluster_dataloader(), strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
    decoded = cached._dataset("train").decoded
    assert decoded.dtype == torch.uint8  # decoded once, kept as bytes
    assert cached._dataset("train").decoded is decoded


def test_decoded_cache_fills_under_inference_mode(tmp_path):
    """Lightning's test loop may ask for a split first under inference mode; the decoding threads
    must still be able to write the array."""
    cached = make_dm(write_shapes(tmp_path / "d", per_class=4), cache="memory")
    plain = make_dm(tmp_path / "d", cache="none")
    with torch.inference_mode():
        loader = cached.test_dataloader()[0]
    assert torch.equal(next(iter(loader))["image"], next(iter(plain.test_dataloader()[0]))["image"])


def test_decoded_cache_auto_holds_only_what_fits(tmp_path):
    folder = write_shapes(tmp_path / "d", per_class=4)
    assert make_dm(folder, cache="auto").caches_in_memory
    bytes_needed = 12 * 1 * 16 * 16
    assert not make_dm(folder, cache="auto", cache_max_gb=(bytes_needed - 1) / 2**30).caches_in_memory
    assert make_dm(folder, cache="auto", cache_max_gb=bytes_needed / 2**30).caches_in_memory
    assert make_dm(folder, cache="none").caches_in_memory is False
    workers = make_dm(folder, cache="memory", num_workers=2)  # a decoded split needs no worker
    assert workers.cluster_dataloader().num_workers == 0
    assert make_dm(folder, cache="none", num_workers=2).cluster_dataloader().num_workers == 2


def test_decompression_bombs_unreadable_files_and_unicode_names(tmp_path, monkeypatch):
    root = write_shapes(tmp_path / "d", per_class=4)
    big = root / "class_2" / "bomb.png"
    Image.new("L", (200, 200)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 pixels: over twice the limit
    os.symlink(tmp_path / "gone.png", root / "class_1" / "dangling.png")
    (root / "class_0" / "żółw 🐢.png").write_bytes((root / "class_0" / "c0_000.png").read_bytes())
    with pytest.warns(UserWarning, match="Skipping 2 unreadable") as record:
        dm = make_dm(root, val_fraction=0.0, test_fraction=0.0)
    message = str(record[0].message)
    assert f"{big}: decompression bomb" in message
    assert f"{root / 'class_1' / 'dangling.png'}: cannot be read" in message
    assert dm.num_train == 13 and root / "class_0" / "żółw 🐢.png" in dm.splits["train"].paths


def test_a_folder_of_only_bad_images_is_an_error(tmp_path):
    folder = tmp_path / "bad" / "x"
    write_bad_files(folder, late=False)
    with pytest.raises(DataError, match="Every image of the train set is unreadable"), \
            pytest.warns(UserWarning):
        make_dm(tmp_path / "bad", val_fraction=0.0, test_fraction=0.0)


def test_invert_turns_dark_strokes_on_white_into_light_on_black(tmp_path):
    from mtl_unsup.data.dataset import decode_transform, float_transform

    pixels = np.full((8, 8), 255, np.uint8)
    pixels[2:6, 3] = 0  # a black stroke on white, as the MNIST PNG copies are
    image = Image.fromarray(pixels, mode="L")
    plain, inverted = (float_transform(invert)(decode_transform(8)(image)) for invert in (False, True))
    assert torch.allclose(inverted, 1 - plain)
    assert inverted[0, 2, 3] == 1.0 and inverted[0, 0, 0] == 0.0


def test_loader_workers_auto_follow_the_cores_and_the_ranks(tmp_path, monkeypatch):
    from mtl_unsup.data import loaders

    for cores, ranks, want in ((2, 1, 1), (16, 1, 8), (16, 4, 3), (1, 1, 1)):
        monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)),
                            raising=False)
        assert loaders.loader_workers("auto", ranks) == want, (cores, ranks)
    assert loaders.loader_workers(3, 4) == 3  # a number is taken as it is
    folder = write_shapes(tmp_path / "d", per_class=4)
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda _pid: set(range(6)), raising=False)
    assert make_dm(folder, cache="none").cluster_dataloader().num_workers == 5  # streamed: auto
    assert make_dm(folder, cache="memory").cluster_dataloader().num_workers == 0  # decoded: none
    assert make_dm(folder, cache="none").cluster_dataloader().pin_memory is False  # no GPU trainer
    for key, value in (("num_workers", "many"), ("num_workers", -1), ("pin_memory", "yes")):
        with pytest.raises(DataError, match=f"data.{key}"):
            make_dm(folder, **{key: value})
