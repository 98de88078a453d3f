import numpy as np
import pytest
import torch
from PIL import Image

from vitcompress.data import load_data
from vitcompress.data.digits import CORRUPTIONS
from vitcompress.errors import DataError

CFG32 = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
         "crop_pct": 1.0, "crop_mode": "center"}


def _all(data):
    xs, ys, gs = zip(*(data.dataset[i] for i in range(len(data))))
    return torch.stack(xs), torch.tensor(ys), torch.tensor(gs)


def test_digits_split_is_fixed_and_labelled():
    train, test = load_data("digits", CFG32, split="train"), load_data("digits", CFG32)
    assert (len(train), len(test)) == (1257, 540) and test.split == "test"
    x, y, _ = _all(test)
    assert x.shape == (540, 3, 32, 32) and set(y.tolist()) == set(range(10))
    assert torch.equal(x, _all(load_data("digits", CFG32))[0])  # deterministic
    assert load_data("digits", CFG32, purpose="calib").split == "train"  # calibration never sees the eval split


def test_digits_follows_the_model_data_config():
    cfg = {**CFG32, "input_size": (3, 48, 48), "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406),
           "std": (0.229, 0.224, 0.225)}
    x = load_data("digits", cfg, limit=4).dataset[0][0]
    assert x.shape == (3, 48, 48)
    assert x.min().item() == pytest.approx((0 - 0.485) / 0.229, abs=0.05)


def test_digits_c_is_large_grouped_deterministic_and_balanced():
    data = load_data("digits-c", CFG32)
    assert len(data) >= 1500 and len(data.groups) >= 5 and data.groups == list(CORRUPTIONS)
    x, y, g = _all(data)
    assert torch.bincount(g).tolist() == [len(data) // len(CORRUPTIONS)] * len(CORRUPTIONS)
    assert torch.equal(x, _all(load_data("digits-c", CFG32))[0])
    small = load_data("digits-c", CFG32, limit=60)
    assert set(_all(small)[2].tolist()) == set(range(len(CORRUPTIONS)))
    clean = _all(load_data("digits", CFG32))[0]
    assert not torch.equal(x[: len(clean)], clean)


def test_digits_c_has_no_train_split():
    with pytest.raises(DataError, match="test split only"):
        load_data("digits-c", CFG32, split="train")


def test_synthetic_has_no_labels():
    data = load_data("synthetic:8", CFG32)
    assert len(data) == 8 and not data.has_labels
    assert _all(data)[1].tolist() == [-1] * 8
    with pytest.raises(DataError, match="bad synthetic spec"):
        load_data("synthetic:x", CFG32)


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)


def test_image_folder(tmp_path):
    for i in range(3):
        _png(tmp_path / "cat" / f"{i}.png", 10)
        _png(tmp_path / "dog" / f"{i}.png", 200)
    data = load_data(str(tmp_path), CFG32)
    x, y, _ = _all(data)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1] and data.num_classes == 2
    assert _all(load_data(str(tmp_path), CFG32, limit=2))[1].tolist() == [0, 1]


def test_image_folder_with_splits(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", 50)
    assert len(load_data(str(tmp_path), CFG32)) == 4  # eval picks val
    assert len(load_data(str(tmp_path), CFG32, purpose="calib")) == 8
    assert len(load_data(str(tmp_path), CFG32, split="train")) == 8
    with pytest.raises(DataError, match="no split 'test'"):
        load_data(str(tmp_path), CFG32, split="test")


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(2):
        _png(tmp_path / f"{i}.png", 0)
    data = load_data(str(tmp_path), CFG32)
    assert len(data) == 2 and not data.has_labels


def _hf_dataset(n=6):
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    imgs = [Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)) for i in range(n)]
    return datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(n)]}, features=feats)


def test_hf_save_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({"train": _hf_dataset(6), "test": _hf_dataset(3)}).save_to_disk(str(tmp_path / "dd"))
    data = load_data(str(tmp_path / "dd"), CFG32)
    assert data.split == "test" and len(data) == 3 and data.num_classes == 3
    assert _all(data)[1].tolist() == [0, 1, 2]
    assert len(load_data(str(tmp_path / "dd"), CFG32, purpose="calib")) == 6
    _hf_dataset(4).save_to_disk(str(tmp_path / "single"))
    assert len(load_data(str(tmp_path / "single"), CFG32)) == 4


def test_parquet_files(tmp_path):
    _hf_dataset(5).to_parquet(str(tmp_path / "test.parquet"))
    data = load_data(str(tmp_path), CFG32)
    assert len(data) == 5 and data.has_labels
    assert _all(data)[0].shape == (5, 3, 32, 32)
    assert len(load_data(str(tmp_path / "test.parquet"), CFG32)) == 5


def test_hub_dataset_offline_fails_cleanly():
    with pytest.raises(DataError, match="cannot load hub dataset 'someone/nothing'"):
        load_data("hf:someone/nothing:test", CFG32)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(DataError, match="unknown data spec or missing path"):
        load_data(str(tmp_path / "absent"), CFG32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_data(str(tmp_path / "empty"), CFG32)
    (tmp_path / "classes" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_data(str(tmp_path / "classes"), CFG32)


def test_limit_below_one_is_refused():
    from vitcompress.errors import ConfigError

    with pytest.raises(ConfigError, match="limit must be an integer >= 1"):
        load_data("digits", CFG32, limit=0)
