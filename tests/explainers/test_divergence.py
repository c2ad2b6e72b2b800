"""Issue 22, item 5: a diverging training is reported as such (step, learning rate), writes no checkpoint of
unusable weights, and load, explain and export refuse non-finite weights or masks."""

from __future__ import annotations

import re

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import tiny_classifier, tiny_explainer_kwargs
from pytorch_lightning.callbacks import ModelCheckpoint

from explainer import cli
from explainer.data import VOCDataModule, synthetic
from explainer.explainers import ExplainerModule, load
from explainer.explainers.export import export, export_safetensors

DIVERGED = r"training diverged at step \d+ \(learning rate 1e\+09\)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("div")
    root = d / "VOC2007"
    synthetic.generate(root, {"train": 8, "val": 4, "test": 4}, seed=0, image_size=32)
    return d, root, tiny_classifier(d / "clf.safetensors")


def dm(root) -> VOCDataModule:
    return VOCDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0)


def step_checkpoints(tmp_path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, save_last=True)


def test_diverging_fit_says_so_and_writes_no_checkpoint(setup, tmp_path):
    """lr 1e9: one Adam step moves every weight by ~1e9; the error names the divergence, the step and the learning
    rate, and the step checkpoints (one after every step) are never written."""
    d, root, clf = setup
    pl.seed_everything(0)
    model = ExplainerModule(**tiny_explainer_kwargs(clf, lr=1e9))
    tr = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, callbacks=[step_checkpoints(tmp_path)], default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match=DIVERGED) as err:
        tr.fit(model, dm(root))
    assert "contains NaN" not in str(err.value)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_healthy_fit_writes_its_step_checkpoints(setup, tmp_path):
    """The checks refuse nothing of a sane training (lr 1e-3): a checkpoint after every step, and they load."""
    d, root, clf = setup
    pl.seed_everything(0)
    model = ExplainerModule(**tiny_explainer_kwargs(clf, lr=1e-3))
    tr = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, callbacks=[step_checkpoints(tmp_path)], default_root_dir=tmp_path)
    tr.fit(model, dm(root))
    assert {p.name for p in (tmp_path / "ck").glob("*.ckpt")} == {"epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt",
                                                                    "last.ckpt"}
    masks = load(tmp_path / "ck" / "last.ckpt").explain(torch.rand(1, 3, 32, 32))
    assert torch.isfinite(masks).all()


def test_diverging_fit_from_the_command_line(setup, tmp_path, capsys):
    """The issue's command: `fit` with lr 1e9 ends with an error saying the training diverged, not bad input."""
    d, root, clf = setup
    cfg = {"seed_everything": 0,
           "trainer": {"max_steps": 3, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                       "enable_model_summary": False, "limit_val_batches": 0, "default_root_dir": str(tmp_path),
                       "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                      "init_args": {"dirpath": str(tmp_path / "ck"), "every_n_train_steps": 1,
                                                    "save_top_k": -1}}]},
           "model": {"class_path": "explainer.explainers.ExplainerModule",
                     "init_args": tiny_explainer_kwargs(clf, explanandum=str(clf), lr=1.0e9)},
           "data": {"class_path": "explainer.data.VOCDataModule",
                    "init_args": {"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0}}}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["fit", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: training diverged at step" in err and "learning rate 1e+09" in err
    assert "contains NaN" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def diverged_weights(clf, root) -> ExplainerModule:
    """The weights the issue found in the step checkpoint: one optimiser step with lr 1e9 (finite, ~1e9)."""
    pl.seed_everything(0)
    model = ExplainerModule(**tiny_explainer_kwargs(clf, lr=1e9))
    data = dm(root)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    opt = torch.optim.Adam(model.net.parameters(), lr=1e9)
    model.compute_losses(batch)["loss"].backward()
    opt.step()
    return model


def write_ckpt(model, path) -> None:
    """A checkpoint as training wrote it before this fix (no checks on save)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("explanandum.")}
    torch.save({"state_dict": sd, "explainer_meta": model.export_metadata()}, path)


def refused_everywhere(model, tmp_path, reason: str) -> None:
    """explain, load (of a checkpoint written without checks), export of that checkpoint and of the module all
    refuse, with ``reason`` (a regex) in the error; no export file appears."""
    with pytest.raises(ValueError, match="not finite"):
        model.explain(torch.rand(2, 3, 32, 32))
    ckpt = tmp_path / "unusable.ckpt"
    write_ckpt(model, ckpt)
    with pytest.raises(ValueError, match=f"{ckpt}.*{reason}"):
        load(ckpt)
    with pytest.raises(ValueError, match=reason):
        export(ckpt, "safetensors", tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match=f"export: refused.*{reason}"):
        export_safetensors(model, tmp_path / "e.safetensors")
    assert not (tmp_path / "e.safetensors").exists()


def test_load_explain_and_export_refuse_weights_of_a_diverged_step(setup, tmp_path):
    d, root, clf = setup
    model = diverged_weights(clf, root)
    weights = [p for p in model.net.parameters()]
    assert all(torch.isfinite(p).all() for p in weights) and max(p.abs().max() for p in weights) > 1e8
    refused_everywhere(model, tmp_path, "masks are not finite")


def test_nan_weights_are_refused_by_name(setup, tmp_path):
    d, root, clf = setup
    torch.manual_seed(0)
    model = ExplainerModule(**tiny_explainer_kwargs(clf))
    name, p = next((n, p) for n, p in model.named_parameters() if n.startswith("net.") and p.dim() == 4)
    with torch.no_grad():
        p[0, 0, 0, 0] = float("nan")
    refused_everywhere(model, tmp_path, f"weights are not finite.*{re.escape(name)}")
    with pytest.raises(ValueError, match=f"weights are not finite.*{re.escape(name)}"):
        model.on_load_checkpoint({"state_dict": {name: p.detach()}, "explainer_meta": model.export_metadata()})
