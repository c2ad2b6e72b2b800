"""LTX: the explainer module (CNN and ViT explananda), training, checkpoints, the methods interface, the CLI."""

import json

import pytest
import pytorch_lightning as pl
import torch

import explainer
import explainer.methods
from explainer.explainers import LTXModule, load
from explainer.explainers.export import export_safetensors
from explainer.explainers.ltx import finetune

SMP_TINY = dict(network="smp", encoder="tu-explainer_resnet_tiny",
                decoder_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})


@pytest.fixture(scope="module")
def vit(tiny_vit):
    return tiny_vit


@pytest.fixture(scope="module")
def cnn8_path(tmp_path_factory):
    """A tiny 8-class multi-label CNN (the synthetic benchmark's classes) saved as a loadable spec."""
    torch.manual_seed(1)
    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=8, multilabel=True)
    return str(explainer.save_explanandum(f, tmp_path_factory.mktemp("f") / "cnn8.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_voc, cnn8_path):
    """Two Lightning training steps + validation on the tiny VOC tree; returns (trainer, module, ckpt, init)."""
    from explainer.data import VOCDataModule

    pl.seed_everything(0)
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, batch_size=4, num_workers=0, limit_train=8, limit_val=4)
    module = LTXModule(cnn8_path, **SMP_TINY, lambda_mask=5.0, lambda_inverse=0.5, warmup_steps=1)
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    root = tmp_path_factory.mktemp("run")
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(root), accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    ckpt = root / "ltx.ckpt"
    trainer.save_checkpoint(ckpt)
    return trainer, module, ckpt, init


@pytest.mark.parametrize("which", ["cnn-backbone", "cnn-smp", "vit-backbone"])
def test_explain_shapes_and_class_agnostic(which, tiny_cnn, vit):
    f, kw, size = {"cnn-backbone": (tiny_cnn, {}, 64), "cnn-smp": (tiny_cnn, SMP_TINY, 48),
                   "vit-backbone": (vit, {}, 32)}[which]
    torch.manual_seed(0)
    x = torch.rand(3, 3, size, size)
    m = LTXModule(f, **kw)
    all_masks = m.explain(x)
    assert all_masks.shape == (3, 4, size, size)
    assert 0 <= all_masks.min() and all_masks.max() <= 1
    one = m.explain(x, [0, 3, 1])
    assert one.shape == (3, 1, size, size)
    assert torch.allclose(one[:, 0], all_masks[torch.arange(3), torch.tensor([0, 3, 1])], atol=1e-6)
    # any input resolution comes back at that resolution (a ViT sees its own input size)
    assert m.explain(torch.rand(1, 3, 40, 56)).shape == (1, 4, 40, 56)
    agn = LTXModule(f, **kw, class_agnostic=True)
    s = agn.explain(x)
    assert s.shape == (3, 4, size, size) and torch.equal(s[:, :1].expand_as(s), s)


def test_backbone_copy_initialised_from_explanandum(tiny_cnn, vit):
    for f in (tiny_cnn, vit):
        m = LTXModule(f)
        own = f.model.state_dict()
        copied = {k: v for k, v in m.net.features.state_dict().items() if k in own}
        assert len(copied) > 5 and all(torch.equal(v, own[k]) for k, v in copied.items())
        fresh = LTXModule(f, init_encoder_from_explanandum=False)
        assert any(not torch.equal(v, own[k]) for k, v in fresh.net.features.state_dict().items()
                   if k in own and v.is_floating_point() and v.numel() > 1)
        # the explainer's copy is trainable, the explanandum is not
        assert all(p.requires_grad for p in m.net.parameters())
        assert not any(p.requires_grad for p in m.explanandum.parameters())


@pytest.mark.parametrize("target", ["groundtruth", "predicted", "kl"])
def test_compute_losses_vit_gradients(target, vit):
    torch.manual_seed(0)
    m = LTXModule(vit, target=target, lambda_inverse=1.0)
    x = torch.rand(3, 3, 32, 32)
    y = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]).float()
    out = m.compute_losses({"image": x, "labels": y})
    assert {"loss", "prediction", "mask", "inverse", "area"} <= set(out)
    expected = out["prediction"] + 50.0 * out["mask"] + out["inverse"]
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    out["loss"].backward()
    assert m.net.head[0].weight.grad is not None and m.net.head[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.explanandum.parameters())


def test_groundtruth_rows_use_the_present_classes(tiny_cnn):
    """Class-conditional training: one row per present class, each with its own map; none for empty images."""
    torch.manual_seed(0)
    m = LTXModule(tiny_cnn, **SMP_TINY)
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]]).float()
    seen = {}
    real = m.objective

    def spy(xr, z, targets, logits, mode=None):
        seen["targets"] = targets.clone()
        return real(xr, z, targets, logits, mode)

    m.objective = spy
    m.compute_losses({"image": x, "labels": y})
    assert seen["targets"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]


def test_lightning_training_logs_and_checkpoint_round_trip(trained, cnn8_path):
    trainer, module, ckpt, init = trained
    assert trainer.global_step == 2
    logged = trainer.callback_metrics
    for key in ("val/loss", "val/prediction", "val/mask", "val/inverse", "val/area", "val/area_all"):
        assert key in logged, key
    assert any(not torch.equal(v, init[k]) for k, v in module.net.state_dict().items() if v.is_floating_point())
    # the linear schedule ends at zero learning rate on the last step
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = ck["explainer_meta"]
    assert meta["kind"] == "ltx" and meta["baseline"] == "black"
    assert meta["hparams"]["target"] == "groundtruth" and meta["hparams"]["lambda_inverse"] == 0.5
    assert not any(k.startswith("explanandum.") for k in ck["state_dict"])
    restored = load(ckpt)
    assert restored.kind == "ltx" and restored.explanandum.spec == cnn8_path
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(restored.explain(x), module.eval().explain(x), atol=1e-6)


def test_vit_safetensors_round_trip(tmp_path, vit):
    torch.manual_seed(0)
    m = LTXModule(vit, class_agnostic=True, target="kl", mask_penalty="softplus")
    with torch.no_grad():
        m.net.head[2].bias.fill_(0.7)  # something the default init does not have
    path = export_safetensors(m, tmp_path / "ltx_vit.safetensors")
    restored = load(path, explanandum=vit)  # the ViT was built in memory: the spec cannot be resolved
    assert restored.hparams.class_agnostic and restored.hparams.mask_penalty == "softplus"
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(restored.explain(x), m.eval().explain(x), atol=1e-6)


def test_methods_ltx_and_pltx(trained):
    _, module, ckpt, _ = trained
    x = torch.rand(2, 3, 64, 64)
    t = torch.tensor([1, 5])
    ltx = explainer.methods.get("ltx", None, checkpoint=str(ckpt), steps=2)
    got = ltx.attribute(x, t)
    want = finetune(load(ckpt), x, t, steps=2)
    assert got.shape == (2, 1, 64, 64) and torch.allclose(got, want, atol=1e-5)
    pre = explainer.methods.get("pltx", None, checkpoint=str(ckpt)).attribute(x, t)
    assert torch.allclose(pre, load(ckpt).explain(x, t), atol=1e-6)
    assert torch.allclose(explainer.methods.get("ltx", None, checkpoint=str(ckpt), pretrained_only=True)
                          .attribute(x, t), pre)
    assert not torch.allclose(pre, got, atol=1e-4)  # finetuning changed the masks
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            explainer.methods.get("ltx", None, checkpoint=str(ckpt), steps=bad)


def test_loading_another_kind_as_ltx_is_an_error(tmp_path, cnn8_path):
    from explainer.explainers import ExplainerModule

    e = ExplainerModule(cnn8_path, encoder="tu-explainer_resnet_tiny")
    path = export_safetensors(e, tmp_path / "explainer.safetensors")
    with pytest.raises(ValueError, match="expected 'ltx'"):
        explainer.methods.get("ltx", None, checkpoint=str(path))
    with pytest.raises(TypeError, match="LTX explainer"):
        finetune(load(path), torch.rand(1, 3, 32, 32), 0, steps=1)


def test_bad_settings_raise_clear_errors(tiny_cnn):
    with pytest.raises(ValueError, match="target"):
        LTXModule(tiny_cnn, target="soft")
    with pytest.raises(ValueError, match="baseline"):
        LTXModule(tiny_cnn, baseline="white")
    with pytest.raises(ValueError, match="network"):
        LTXModule(tiny_cnn, network="unet")
    with pytest.raises(ValueError, match="lambda_mask"):
        LTXModule(tiny_cnn, lambda_mask=-1)
    with pytest.raises(ValueError, match="backbone"):
        plain = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
        LTXModule(explainer.Explanandum(plain, 4))
    m = LTXModule(tiny_cnn)
    with pytest.raises(ValueError, match="groundtruth"):
        m.compute_losses({"image": torch.rand(2, 3, 32, 32)})  # no labels
    with pytest.raises(ValueError, match="labels"):
        m.compute_losses({"image": torch.rand(2, 3, 32, 32), "labels": torch.zeros(2, 7)})


def test_finetune_cli(tmp_path, trained, tiny_voc):
    from explainer.explainers.ltx import FINETUNE_PRESETS
    from explainer.pipelines.finetune import main

    _, _, ckpt, _ = trained
    cfg = tmp_path / "ft.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"checkpoint: {ckpt}\nvoc_root: {tiny_voc}\nsplit: test\nlimit: 2\nsteps: 1\n"
                   f"size: 64\nout: {out}\nprogress: false\n")
    assert main(["--config", str(cfg), "--top_k", "2"]) == 0
    report = json.loads((out / "explanations.json").read_text())
    assert len(report) == 2 and all(len(v["top_classes"]) == 2 for v in report.values())
    assert len(list(out.glob("*_mask.png"))) == 4
    settings = json.loads((out / "finetune.json").read_text())
    assert settings["steps"] == 1 and settings["top_k"] == 2
    recorded = {"lambda_mask": 5.0, "lambda_inverse": 0.5, "baseline": "black", "mask_penalty": "mean",
                "kl_scope": "all", "lambda_curve": 0.0, "curve_areas": [0.05, 0.1, 0.25, 0.5], "curve_temperature": 0.1}
    # the default: the finetuning settings recorded in the checkpoint (the validated preset) over the pretraining
    # objective
    validated = FINETUNE_PRESETS["validated"]
    assert settings["objective"] == {**recorded, **validated["objective"]}
    assert settings["lr"] == validated["lr"] and settings["target_mode"] == validated["mode"]
    assert main(["--config", str(cfg), "--preset", "paper"]) == 0
    settings = json.loads((out / "finetune.json").read_text())
    assert settings["objective"] == recorded  # the paper's: the pretraining objective, recorded
    assert settings["lr"] == FINETUNE_PRESETS["paper"]["lr"] and settings["target_mode"] == "groundtruth"
    assert main(["--config", str(cfg), "--objective", '{"baseline": "mean", "lambda_inverse": 3}']) == 0
    settings = json.loads((out / "finetune.json").read_text())
    assert settings["objective"] == {**recorded, "lambda_inverse": 3, "baseline": "mean"}
    cfg.write_text(f"checkpoint: {ckpt}\nout: {out}\nstepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        main(["--config", str(cfg)])


def test_onnx_export_matches(trained, tmp_path, vit):
    """LTX exports like the Explainer: ONNX (dynamic batch) matches PyTorch's all-class masks (CNN and ViT)."""
    import numpy as np
    import onnxruntime as ort

    from explainer.explainers.export import export, export_onnx

    _, _, ckpt, _ = trained
    torch.manual_seed(0)
    vit_module = LTXModule(vit, lambda_mask=5.0).eval()
    cases = [(load(ckpt), export(ckpt, "onnx", tmp_path / "ltx.onnx", input_size=64), 64),
             (vit_module, export_onnx(vit_module, tmp_path / "ltx_vit.onnx", 32), 32)]
    for module, path, size in cases:
        x = torch.rand(3, 3, size, size)
        ref = module.explain(x)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for b in (1, 3):
            out = sess.run(None, {sess.get_inputs()[0].name: x[:b].numpy()})[0]
            assert out.shape == (b, 8 if size == 64 else vit.num_classes, size, size)
            assert np.abs(out - ref[:b].numpy()).max() < 1e-4
