"""The explanandum: resolution of specs, freezing, normalisation, errors."""

import time

import pytest
import torch
from torch import nn

import explainer
from explainer.explanandum import Explanandum, check_images


def test_timm_spec_is_frozen_and_normalises_inside():
    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=3, multilabel=True,
                                   class_names=["a", "b", "c"], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert isinstance(f, Explanandum) and not f.training
    assert f.num_classes == 3 and f.class_names == ["a", "b", "c"] and f.multilabel
    assert not any(p.requires_grad for p in f.parameters())
    f.train()
    assert not f.training and not any(m.training for m in f.modules())
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(f(x), f.model((x - 0.5) / 0.25))
    p = f.probabilities(f(x))
    assert torch.allclose(p, torch.sigmoid(f(x)))


def test_safetensors_round_trip(tmp_path):
    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4, class_names=list("wxyz"))
    path = explainer.save_explanandum(f, tmp_path / "clf.safetensors")
    g = explainer.load_explanandum(path)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(f(x), g(x)) and g.class_names == list("wxyz")
    with pytest.raises(ValueError, match="expected 5 classes.*trained for 4"):
        explainer.load_explanandum(path, num_classes=5)
    # a truncated file
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt|not a readable"):
        explainer.load_explanandum(bad)


def test_lightning_classifier_checkpoint(tmp_path, tiny_voc):
    import pytorch_lightning as pl

    from explainer.classifier import ClassifierModule
    from explainer.data import VOCDataModule

    dm = VOCDataModule(root=str(tiny_voc), image_size=32, batch_size=8, num_workers=0)
    model = ClassifierModule(arch="explainer_resnet_tiny", num_classes=8)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=1, enable_model_summary=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "clf.ckpt")
    f = explainer.load_explanandum(tmp_path / "clf.ckpt")
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(f(x), model(x), atol=1e-6)
    assert f.class_names == dm.class_names and f.multilabel


def test_factory_specs(tmp_path):
    src = tmp_path / "my_model.py"
    src.write_text("import torch.nn as nn\n"
                   "def make(num_classes=5):\n"
                   "    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
                   " nn.Linear(4, num_classes))\n"
                   "    m.class_names = [f'k{i}' for i in range(num_classes)]\n"
                   "    return m\n")
    f = explainer.load_explanandum(f"{src}:make", num_classes=3)
    assert f.num_classes == 3 and f.class_names == ["k0", "k1", "k2"]
    g = explainer.load_explanandum(f"{src}:make")
    assert g.num_classes == 5


def test_user_weights_file(tmp_path):
    from safetensors.torch import save_file

    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4)
    save_file(f.model.state_dict(), tmp_path / "w.safetensors")
    g = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4, weights=tmp_path / "w.safetensors")
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(f(x), g(x))
    with pytest.raises(ValueError, match="do not fit"):
        explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=6, weights=tmp_path / "w.safetensors")


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_offline_fails_fast_with_help(spec, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-cache")
    t = time.time()
    with pytest.raises(Exception, match="weights="):
        explainer.load_explanandum(spec, weights="pretrained")
    assert time.time() - t < 15


@pytest.mark.parametrize("spec,match", [
    ("timm:no_such_net", "timm has no model"),
    ("torchvision:no_such_net", "torchvision has no model"),
    ("nothing_at_all", "cannot resolve"),
    ("/no/such/file.safetensors", "no such checkpoint"),
    ("no_such_pkg.mod:fn", "cannot import"),
])
def test_unresolvable_specs(spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        explainer.load_explanandum(spec)


def test_bad_images(tiny_cnn):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_cnn(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="3 RGB channels"):
        tiny_cnn(torch.rand(1, 1, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        tiny_cnn(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_cnn(torch.rand(1, 3, 32, 32) * 255)
    x = torch.rand(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_images(x)


def test_frozen_while_something_trains_against_it():
    """BN statistics and outputs of the explanandum do not move while a model trains against it."""
    import pytorch_lightning as pl

    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4, multilabel=True)
    before = {k: v.clone() for k, v in f.state_dict().items()}
    x0 = torch.rand(4, 3, 32, 32)
    out0 = f(x0).clone()

    class Student(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.f = f
            self.net = nn.Conv2d(3, 1, 3, padding=1)

        def training_step(self, batch, _):
            assert self.training and not self.f.training
            m = torch.sigmoid(self.net(batch))
            return self.f(batch * m).sum() + m.mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.rand(16, 3, 32, 32), batch_size=4)
    pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(Student(), data)
    for k, v in f.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(f(x0), out0)


def test_save_refuses_a_classifier_it_cannot_rebuild(tmp_path):
    """A classifier built from a module has no architecture name a checkpoint could rebuild it from."""
    f = explainer.load_explanandum(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3)),
                                   class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="timm:<name>"):
        explainer.save_explanandum(f, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
