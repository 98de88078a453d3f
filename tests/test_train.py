import torch
from conftest import TINY
from vitcompress.recipes import recipe_path

from vitcompress.train import TrainConfig, load_recipe, train
from vitcompress.training import augment, lr_at


def test_bundled_recipe_is_a_valid_train_config():
    data = load_recipe(recipe_path("digits_vit"))
    cfg = TrainConfig.from_dict(data["train"])
    assert cfg.model_kwargs["img_size"] == 32 and cfg.model_kwargs["patch_size"] == 4 and cfg.data == "digits"


def test_augment_is_identity_at_zero_strength():
    cfg = TrainConfig(aug_rotate=0, aug_scale=0, aug_translate=0)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(augment(x, cfg, torch.Generator()), x)
    moved = augment(x, TrainConfig(), torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and not torch.equal(moved, x)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, 100, 10, cfg) for s in range(100)]
    assert lrs[9] == cfg.lr and lrs[0] < lrs[9]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] >= cfg.min_lr


def test_training_learns():
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, epochs=8, batch_size=32, limit=512,
                      warmup_epochs=0.5, lr=2e-3, label_smoothing=0.0)
    _, metrics = train(cfg)
    assert metrics["final_loss"] < 2.05  # chance is ln(10) = 2.30
    assert metrics["top1"] > 20 and metrics["eval_data"] == "digits:test"  # chance is 10 %


def test_training_is_seeded():
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, epochs=1, batch_size=32, limit=64,
                      eval_data=None)
    (m1, met1), (m2, met2) = train(cfg), train(cfg)
    assert met1["final_loss"] == met2["final_loss"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
