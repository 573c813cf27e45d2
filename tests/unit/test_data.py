import collections
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ray_ad.data import (
    ImageDataset,
    Sample,
    dataset_kind,
    is_folder_uri,
    load_samples,
    split_calibration,
    write_manifest,
)
from ray_ad.data.images import Preprocessor, decode_image, to_tensor
from ray_ad.errors import DataError
from tests.conftest import make_mvtec, upload_folder


def test_mvtec_layout_reads_splits_labels_and_masks(tiny_mvtec):
    samples = load_samples(str(tiny_mvtec))
    counts = collections.Counter((s.split, s.defect, s.label) for s in samples)
    assert counts == {("train", "good", 0): 12, ("test", "good", 0): 4, ("test", "spot", 1): 4}
    bad = [s for s in samples if s.label == 1]
    assert all(s.mask_path and s.mask_path.endswith("_mask.png") for s in bad)


def test_grayscale_becomes_three_channels_and_masks_are_binary(tiny_mvtec):
    samples = [s for s in load_samples(str(tiny_mvtec), "test") if s.label == 1]
    item = ImageDataset(samples, Preprocessor(32, (0.5,) * 3, (0.5,) * 3))[0]
    assert item["image"].shape == (3, 32, 32)
    assert torch.equal(item["image"][0], item["image"][1])
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["has_mask"]


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "I;16"])
def test_image_tensors_are_normalised_and_gray_is_resized_as_one_channel(mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        source = Image.fromarray(rng.integers(0, 4096, (23, 37), dtype=np.uint16))
    else:
        source = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)).convert(mode)
    sink = io.BytesIO()
    source.save(sink, format="PNG")
    gray_kept = decode_image(sink.getvalue(), "cam.png", keep_gray=True)
    rgb = decode_image(sink.getvalue(), "cam.png")
    assert rgb.mode == "RGB" and gray_kept.mode == ("L" if mode in ("L", "I;16") else "RGB")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    # The definition: resize the RGB image, scale to [0, 1], subtract the mean, divide by the std.
    expected = torch.from_numpy(np.asarray(rgb.resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255.0)
    expected = (expected.permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    for image in (gray_kept, rgb):
        torch.testing.assert_close(to_tensor(image, 16, mean, std), expected, rtol=0, atol=1e-5)


def test_mask_of_the_wrong_size_names_the_mask(tiny_mvtec):
    mask_path = tiny_mvtec / "ground_truth" / "spot" / "000_mask.png"
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(mask_path)
    samples = [s for s in load_samples(str(tiny_mvtec), "test") if s.mask_path == str(mask_path)]
    with pytest.raises(DataError, match="000_mask.png is 10x10 but its image is 64x64"):
        ImageDataset(samples, Preprocessor(32, (0.5,) * 3, (0.5,) * 3))[0]


def test_missing_mask_and_unreadable_image_are_named(tiny_mvtec):
    (tiny_mvtec / "ground_truth" / "spot" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="missing mask for .*001.png"):
        load_samples(str(tiny_mvtec))
    (tiny_mvtec / "ground_truth" / "spot" / "001_mask.png").write_bytes(b"")
    broken = tiny_mvtec / "train" / "good" / "000.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    samples = [s for s in load_samples(str(tiny_mvtec), "train") if s.path == str(broken)]
    with pytest.raises(DataError, match="000.png: not a readable image"):
        ImageDataset(samples, Preprocessor(32, (0.5,) * 3, (0.5,) * 3))[0]


def test_empty_split_and_missing_folder(tiny_mvtec, tmp_path):
    with pytest.raises(DataError, match="no images in split 'validation'"):
        load_samples(str(tiny_mvtec), "validation")
    with pytest.raises(DataError, match="dataset folder not found: .*nowhere"):
        load_samples(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="not an MVTec-layout dataset"):
        load_samples(str(tmp_path / "flat"))


def test_empty_image_bytes_are_rejected():
    with pytest.raises(DataError, match="cam.png: empty file"):
        decode_image(b"", "cam.png")


def test_parquet_manifest_round_trip_with_relative_paths(tiny_mvtec, tmp_path):
    samples = load_samples(str(tiny_mvtec))
    manifest = tmp_path / "m.parquet"
    write_manifest(samples, str(manifest))
    again = load_samples(str(manifest))
    assert [(s.path, s.label, s.mask_path, s.split) for s in again] == [
        (s.path, s.label, s.mask_path, s.split) for s in samples
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["train/good/000.png"], "split": ["train"]}), tiny_mvtec / "rel.parquet")
    (rel,) = load_samples(str(tiny_mvtec / "rel.parquet"))
    assert rel.path == str(tiny_mvtec / "train" / "good" / "000.png") and rel.label == -1
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="lacks column"):
        load_samples(str(tmp_path / "bad.parquet"))


def test_mvtec_layout_over_s3(tiny_mvtec, s3_bucket):
    upload_folder(tiny_mvtec, f"{s3_bucket}/tiny")
    samples = load_samples(f"{s3_bucket}/tiny")
    assert len(samples) == 20 and all(s.path.startswith("s3://") for s in samples)
    item = ImageDataset([s for s in samples if s.label == 1], Preprocessor(32, (0.5,) * 3, (0.5,) * 3))[0]
    assert item["mask"].sum() > 0


def test_elpv_domains_labels_and_deterministic_splits():
    mono, poly = load_samples("elpv:mono"), load_samples("elpv:poly")
    assert {s.domain for s in mono} == {"elpv-mono"} and {s.domain for s in poly} == {"elpv-poly"}
    assert {s.label for s in mono} == {0, 1}
    assert all(s.label == 0 for s in mono if s.split == "train")
    assert [s.path for s in load_samples("elpv:mono")] == [s.path for s in mono]
    with_ambiguous = load_samples("elpv:mono?ambiguous=defective")
    assert len(with_ambiguous) > len(mono)
    with pytest.raises(DataError, match="unknown elpv domain"):
        load_samples("elpv:cadmium")


def test_calibration_split_is_deterministic_and_disjoint(tiny_mvtec):
    train = load_samples(str(tiny_mvtec), "train")
    fit, held = split_calibration(train, 0.25)
    assert len(held) == 3 and len(fit) == 9
    assert not {s.path for s in fit} & {s.path for s in held}
    assert split_calibration(train, 0.25) == (fit, held)


def test_calibration_split_does_not_depend_on_where_the_data_lives(tmp_path):
    names = []
    for where in ("here", "elsewhere/deeper"):
        root = make_mvtec(tmp_path / where, n_train=20)
        _, held = split_calibration(load_samples(str(root), "train"), 0.2)
        names.append(sorted(s.path[len(str(root)):] for s in held))
    assert len(names[0]) == 4 and names[0] == names[1]


def test_labelled_calibration_split_keeps_normals_and_anomalies_in_both_parts(tmp_path):
    labelled = load_samples(str(make_mvtec(tmp_path / "d", n_train=10, n_good=4, n_bad=3)))
    for fraction in (0.05, 0.1, 0.3):
        fit, held = split_calibration(labelled, fraction)
        for part in (fit, held):
            assert {s.label for s in part} == {0, 1}, (fraction, [(s.path, s.label) for s in part])
    one_each = [s for s in labelled if s.label == 0][:1] + [s for s in labelled if s.label == 1][:1]
    fit, held = split_calibration(one_each, 0.1)
    assert [s.label for s in held] == [0] and [s.label for s in fit] == [1]


def test_real_magnetic_tile_layout(magnetic_tile):
    samples = load_samples(str(magnetic_tile))
    counts = collections.Counter((s.split, s.label) for s in samples)
    assert counts == {("train", 0): 761, ("test", 0): 191, ("test", 1): 392}
    assert all(s.mask_path for s in samples if s.label == 1)


def test_sample_lives_in_its_own_module_and_uris_are_told_apart_by_name():
    from ray_ad.data import dataset, elpv, sample

    assert Sample is sample.Sample is dataset.Sample and elpv.Sample is sample.Sample
    assert [dataset_kind(u) for u in ("elpv:poly?layout=landing", "s3://b/m.parquet", "runs/landing/b1")] == [
        "elpv", "manifest", "folder"]
    assert is_folder_uri("s3://bucket/batch") and not is_folder_uri("elpv:mono") and not is_folder_uri("m.parquet")
