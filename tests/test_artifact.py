import dataclasses
import json

import pytest
import torch
from conftest import TINY
from torch import nn

import vitcompress
from vitcompress import compress_, create_model, load_artifact, model_info, register_transform, save_artifact
from vitcompress.artifact import LOCK, MANIFEST, VERSION_PREFIX, WEIGHTS, version_dir
from vitcompress.config import Config, StrEnum
from vitcompress.errors import CheckpointError, ConfigError
from vitcompress.pipeline import load_base


class Where(StrEnum):
    FRONT = "front"
    BACK = "back"


@dataclasses.dataclass
class KeepBlocksConfig(Config):
    """A toy structural transform (test only): keep ``keep`` blocks from the front or back."""

    NAME = "test_keep_blocks"
    VERSION = 2
    keep: int = 1
    where: Where = Where.FRONT

    def validate(self) -> None:
        if self.keep < 1:
            raise ConfigError("keep must be >= 1")

    @classmethod
    def _upgrade(cls, data, version):
        data = dict(data)
        if "n" in data:  # version 1 called it n
            data["keep"] = data.pop("n")
        return data


@register_transform(KeepBlocksConfig)
def _keep_blocks(model: nn.Module, cfg: KeepBlocksConfig, ctx) -> dict:
    blocks = list(model.blocks)
    kept = blocks[: cfg.keep] if cfg.where == Where.FRONT else blocks[-cfg.keep:]
    model.blocks = nn.Sequential(*kept)
    return {"kept": len(kept)}


def _logits(model, seed=0):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(x)


def test_round_trip_is_bit_exact(tmp_path, tiny_model):
    save_artifact(tiny_model, tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert torch.equal(_logits(loaded), _logits(tiny_model))
    assert model_info(loaded).kwargs == TINY
    names = sorted(p.name for p in (tmp_path / "a").iterdir())  # one version folder, the two links, the lock
    assert names[0] == LOCK and names[1].startswith(VERSION_PREFIX) and names[2:] == [WEIGHTS, MANIFEST]
    assert sorted(p.name for p in (tmp_path / "a" / names[1]).iterdir()) == [WEIGHTS, MANIFEST]  # no temp files


def test_round_trip_replays_transforms_and_records_the_base(tmp_path, tiny_model):
    save_artifact(tiny_model, tmp_path / "base")
    model = create_model(str(tmp_path / "base"))
    compress_(model, KeepBlocksConfig(keep=1, where="back"))
    save_artifact(model, tmp_path / "small", metrics={"top1": 1.0}, provenance={"data": "digits"})
    manifest = json.loads((tmp_path / "small" / MANIFEST).read_text())
    assert manifest["schema_version"] == 1
    assert manifest["transforms"] == [{"name": "test_keep_blocks", "version": 2,
                                       "config": {"name": "test_keep_blocks", "version": 2, "keep": 1, "where": "back"},
                                       "state": {"kept": 1}}]
    assert manifest["base"]["path"] == "../base" and manifest["metrics"] == {"top1": 1.0}
    assert manifest["provenance"]["data"] == "digits" and "torch" in manifest["provenance"]["versions"]

    loaded = load_artifact(tmp_path / "small")
    assert len(loaded.blocks) == 1
    assert torch.equal(_logits(loaded), _logits(model))
    base = load_base(loaded)
    assert base is not None and len(base.blocks) == 2
    assert torch.equal(_logits(base), _logits(tiny_model))

    from vitcompress.data import load_data
    from vitcompress.evaluate import evaluate

    result = evaluate(loaded, load_data("synthetic:8", vitcompress.data_config(loaded)), speed=False)
    assert result["reference"]["source"] == str((tmp_path / "base").resolve())
    assert result["agreement"] is not None and result["kl"] > 0


def test_config_dicts_are_versioned_and_enums_take_strings():
    cfg = KeepBlocksConfig.from_dict({"name": "test_keep_blocks", "version": 1, "n": 2, "where": "back"})
    assert cfg.keep == 2 and cfg.where is Where.BACK and cfg.where == "back"
    assert KeepBlocksConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="where must be one of: front, back"):
        KeepBlocksConfig(where="middle")
    with pytest.raises(ConfigError, match="unknown test_keep_blocks setting"):
        KeepBlocksConfig.from_dict({"keep": 1, "colour": "red"})
    with pytest.raises(ConfigError, match="newer than this vitcompress supports"):
        KeepBlocksConfig.from_dict({"version": 3, "keep": 1})
    with pytest.raises(ConfigError, match="keep must be >= 1"):
        KeepBlocksConfig(keep=0)


@pytest.fixture
def saved(tmp_path, tiny_model):
    return save_artifact(tiny_model, tmp_path / "a")


def test_truncated_weights_are_detected(saved):
    w = saved / WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt: model.safetensors does not match"):
        load_artifact(saved)


def test_missing_weights(saved):
    (version_dir(saved) / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="incomplete: model.safetensors is missing"):
        load_artifact(saved)


def test_corrupt_manifest(saved):
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_artifact(saved)


def test_newer_schema_is_refused(saved):
    m = json.loads((saved / MANIFEST).read_text())
    (saved / MANIFEST).write_text(json.dumps({**m, "schema_version": 99}))
    with pytest.raises(CheckpointError, match="schema version 99"):
        load_artifact(saved)


def test_manifest_that_does_not_match_the_weights(saved):
    m = json.loads((saved / MANIFEST).read_text())
    m["model"]["kwargs"]["depth"] = 3
    (saved / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="does not match model 'vit_tiny_patch16_224'.*missing key"):
        load_artifact(saved)


def test_overwriting_an_artifact_in_place(saved, tiny_model):
    with torch.no_grad():
        tiny_model.head.bias.add_(1.0)
    save_artifact(tiny_model, saved)
    assert torch.equal(_logits(load_artifact(saved)), _logits(tiny_model))
