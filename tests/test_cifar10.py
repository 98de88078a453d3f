"""CIFAR-10 in the hub's image-Parquet layout (the shared copy; skipped without it), cifar10-c, and bad rows."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY
from PIL import Image

from vitcompress import create_model, data_config
from vitcompress.data import load_data
from vitcompress.errors import DataError

CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0, "interpolation": "bicubic"}


def test_hub_parquet_layout_loads_both_splits(cifar10_dir):
    train = load_data(str(cifar10_dir), CFG, purpose="train", limit=200)
    test = load_data(str(cifar10_dir), CFG, limit=200)
    assert (train.split, test.split, len(train), len(test)) == ("train", "test", 200, 200)
    x, y, _ = next(iter(test.loader(200)))
    assert x.shape == (200, 3, 32, 32) and set(y.tolist()) == set(range(10))  # evenly spaced: every class
    assert train.num_classes == 10 and test.provenance["format"] == "parquet"


def test_cifar10c_is_seeded_and_grouped(cifar10_dir):
    a = load_data(f"cifar10-c:{cifar10_dir}", CFG, limit=300)
    b = load_data(f"cifar10-c:{cifar10_dir}", CFG, limit=300)
    clean = load_data(str(cifar10_dir), CFG, limit=300)
    assert a.groups == ["gaussian_noise", "blur", "contrast", "jpeg", "occlusion", "pixelate"]
    xa, ya, ga = next(iter(a.loader(300)))
    xb, _, _ = next(iter(b.loader(300)))
    xc, yc, _ = next(iter(clean.loader(300)))
    assert torch.equal(xa, xb) and torch.equal(ya, yc)  # same images and labels, same corruptions every time
    assert not torch.equal(xa, xc) and len(set(ga.tolist())) == 6
    with pytest.raises(DataError, match="never train or calibrate"):
        load_data(f"cifar10-c:{cifar10_dir}", CFG, purpose="calib")


def test_eval_cli_on_the_shared_copy(cli, cifar10_dir, tmp_path):
    # asserts on the JSON, never on rich's table text (whose wrapping depends on the data path's length)
    rc, out, err = cli("eval", "vit_tiny_patch16_224", "--random-weights", "--img-size", "32", "--patch-size", "8",
                       "--num-classes", "10",
                       "--data", cifar10_dir, "--split", "test", "--limit", "200", "--no-speed",
                       "--json", tmp_path / "e.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["n_images"] == 200


def _parquet(path, rows):
    images = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(rows)],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": pa.array(list(range(len(rows))), pa.int64())}), path)


def _jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_corrupt_parquet_row_is_one_line_naming_file_and_row(tmp_path, cli):
    (tmp_path / "d").mkdir()
    _parquet(tmp_path / "d" / "test.parquet", [_jpeg(0), b"not an image", _jpeg(2)])
    model = create_model("vit_tiny_patch16_224", **TINY)
    data = load_data(str(tmp_path / "d"), data_config(model))
    with pytest.raises(DataError, match=r"test.parquet, row 1"):
        list(data.loader(3))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "test.parquet").write_bytes(b"PAR1 truncated")
    rc, _, err = cli("eval", "vit_tiny_patch16_224", "--random-weights", "--img-size", "32", "--patch-size", "8",
                     "--num-classes", "10",
                     "--data", tmp_path / "e", "--no-speed")
    assert rc != 0 and "cannot read parquet file" in err and "Traceback" not in err and err.count("\n") == 1
