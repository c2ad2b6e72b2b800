"""The Explainer: training with Lightning, frozen explanandum, resume, export, inference, errors."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import tiny_classifier, tiny_explainer_kwargs
from pytorch_lightning.callbacks import ModelCheckpoint

from explainer.data import VOCDataModule
from explainer.explainers import ExplainerModule, load
from explainer.explainers.export import export


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("clf") / "clf.safetensors")


def _dm(tiny_voc, **kw):
    args = dict(root=str(tiny_voc), image_size=64, batch_size=4, num_workers=0, rotate90=True)
    args.update(kw)
    return VOCDataModule(**args)


def _trainer(tmp_path, **kw):
    args = dict(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                limit_train_batches=3, limit_val_batches=2, default_root_dir=tmp_path, deterministic=True)
    args.update(kw)
    return pl.Trainer(**args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_voc, clf):
    tmp = tmp_path_factory.mktemp("run")
    pl.seed_everything(0)
    model = ExplainerModule(**tiny_explainer_kwargs(clf, lambda_class=1.0))
    f_before = {k: v.clone() for k, v in model.explanandum.state_dict().items()}
    ck = ModelCheckpoint(dirpath=tmp / "ck", save_last=True)
    _trainer(tmp, callbacks=[ck], enable_checkpointing=True).fit(model, _dm(tiny_voc))
    return model, tmp / "ck" / "last.ckpt", f_before


def test_training_keeps_explanandum_frozen_and_logs(trained):
    model, ckpt, f_before = trained
    for k, v in model.explanandum.state_dict().items():
        assert torch.equal(v, f_before[k]), k
    metrics = model.trainer.callback_metrics
    for key in ("val/loss", "val/cls", "val/ent", "val/tv", "val/area", "val/mask", "val/nontarget", "val/class",
                "val/miou", "val/area_present", "val/area_absent"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    # the checkpoint does not carry the explanandum's weights, but names it
    ck = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("explanandum.") for k in ck["state_dict"])
    assert ck["explainer_meta"]["explanandum"]["fingerprint"] == model.explanandum_fingerprint
    assert ck["explainer_meta"]["baseline"] == "mean"


def test_explain_shapes_targets_and_resolution(trained):
    model, ckpt, _ = trained
    e = load(ckpt)
    assert e.explanandum.class_names == model.explanandum.class_names
    x = torch.rand(3, 3, 64, 64)
    all_masks = e.explain(x)
    assert all_masks.shape == (3, 8, 64, 64) and 0 <= all_masks.min() and all_masks.max() <= 1
    model.eval()
    assert torch.allclose(all_masks, torch.sigmoid(model(x)), atol=1e-6)
    one = e.explain(x, [1, 5, 7])
    assert torch.equal(one[:, 0], torch.stack([all_masks[0, 1], all_masks[1, 5], all_masks[2, 7]]))
    assert torch.equal(e.explain(x, 2), all_masks[:, 2:3])
    assert torch.equal(e.explain(x, torch.tensor([0, 1, 2])), all_masks[[0, 1, 2], [0, 1, 2]][:, None])
    assert e.explain(torch.rand(2, 3, 50, 71)).shape == (2, 8, 50, 71)
    assert torch.allclose(e.explain(x, batch_size=2), all_masks)


def test_channels_last_gives_the_same_masks(clf):
    """channels_last (the default, for speed) changes the memory layout only: the same weights give the same
    masks in either format, gradients included (float64: no rounding noise), and the weights load across formats."""
    torch.manual_seed(0)
    cl = ExplainerModule(**tiny_explainer_kwargs(clf, channels_last=True))
    plain = ExplainerModule(**tiny_explainer_kwargs(clf, channels_last=False))
    plain.load_state_dict(cl.state_dict())
    conv = next(p for p in cl.net.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.rand(3, 3, 80, 64)
    assert torch.allclose(cl.explain(x), plain.explain(x), atol=1e-5)
    cl, plain, x = cl.double(), plain.double(), x.double()
    batch = {"image": x, "labels": torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 0]] * 3, dtype=torch.float64)}
    a, b = cl.compute_losses(batch)["loss"], plain.compute_losses(batch)["loss"]
    assert torch.allclose(a, b, atol=1e-10)
    a.backward()
    b.backward()
    ga = dict(cl.net.named_parameters())
    for name, p in plain.net.named_parameters():
        assert torch.allclose(ga[name].grad, p.grad, atol=1e-10), name


def test_explain_bad_input(trained):
    e = load(trained[1])
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        e.explain(x, [0, 8])
    with pytest.raises(ValueError, match="one per image"):
        e.explain(x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        e.explain(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        e.explain(x * 10)
    with pytest.raises(TypeError, match="integer"):
        e.explain(x, torch.tensor([0.5, 1.0]))


def test_checkpoint_for_another_explanandum_and_truncated_files(trained, tmp_path):
    _, ckpt, _ = trained
    other = tiny_classifier(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(ValueError, match="another classifier"):
        load(ckpt, explanandum=str(other))
    data = ckpt.read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        load(bad)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.ckpt")
    # a classifier checkpoint is not an explainer
    with pytest.raises(ValueError, match="not written by this project|expected explainer"):
        load(other)


def test_exports_round_trip_and_onnx_matches(trained, tmp_path):
    _, ckpt, _ = trained
    e = load(ckpt)
    x = torch.rand(3, 3, 64, 64)
    ref = e.explain(x)
    st = export(ckpt, "safetensors", tmp_path / "e.safetensors")
    assert torch.allclose(load(st).explain(x), ref, atol=1e-6)
    onnx_path = export(ckpt, "onnx", tmp_path / "e.onnx", input_size=64)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for b in (1, 3):  # dynamic batch
        out = sess.run(None, {sess.get_inputs()[0].name: x[:b].numpy()})[0]
        assert out.shape == (b, 8, 64, 64)
        assert np.abs(out - ref[:b].numpy()).max() < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    with pytest.raises(ValueError, match="format"):
        export(ckpt, "pickle", tmp_path / "x")


def test_explain_cli_writes_masks_and_json(trained, tiny_voc, tmp_path):
    from explainer.cli import main

    rc = main(["explain", "--checkpoint", str(trained[1]), "--images", str(tiny_voc / "JPEGImages"),
               "--out", str(tmp_path / "out"), "--top-k", "2"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "explanations.json").read_text())
    assert len(report) == 48
    first = next(iter(report.values()))["top_classes"]
    assert len(first) == 2 and first[0]["probability"] >= first[1]["probability"]
    assert 0 <= first[0]["mask_area"] <= 1
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 96
    assert main(["explain", "--checkpoint", str(tmp_path / "none.ckpt"), "--images", ".", "--out", "x"]) == 1


def test_methods_interface_wraps_the_explainer(trained):
    import explainer.methods as M

    e = load(trained[1])
    m = M.get("explainer", e.explanandum, checkpoint=str(trained[1]))
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(m.attribute(x, [3, 4]), e.explain(x, [3, 4]))
    top = e.explanandum(x).argmax(1)
    assert torch.allclose(m.attribute(x), e.explain(x, top))


def test_resume_gives_the_same_weights(tiny_voc, clf, tmp_path):
    def fresh():
        pl.seed_everything(0)
        return ExplainerModule(**tiny_explainer_kwargs(clf, lambda_class=1.0, lr_schedule="cosine",
                                                       warmup_steps=2))

    full = fresh()
    _trainer(tmp_path / "a", max_epochs=2).fit(full, _dm(tiny_voc))
    class Kill(pl.Callback):  # the run is stopped after its first epoch
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    part = fresh()
    ck = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    _trainer(tmp_path / "b", max_epochs=2, callbacks=[ck, Kill()]).fit(part, _dm(tiny_voc))
    assert part.current_epoch == 1
    resumed = fresh()
    t = _trainer(tmp_path / "b", max_epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)])
    t.fit(resumed, _dm(tiny_voc), ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert torch.allclose(full.trainer.callback_metrics["val/loss"], t.callback_metrics["val/loss"], atol=1e-6)


def test_sharpen_switches_the_objective_at_its_share_of_the_steps(tiny_voc, clf, tmp_path):
    """``sharpen``: the first half of 4 steps trains with the module's objective, the second with the overrides;
    the loss of a step is the objective of the settings in force (recomputed from its terms)."""
    from explainer.explainers.explainer import explainer_objective

    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            settings = module.objective_settings()
            with torch.no_grad():
                out = module.compute_losses(batch)
                S = out["_S"]
                plain = explainer_objective(module, batch["image"], batch["labels"], S, settings)
            seen.append((trainer.global_step, settings, out, plain))

    pl.seed_everything(0)
    model = ExplainerModule(**tiny_explainer_kwargs(clf, lambda_mask=0.1, area_max=0.3,
                                                    sharpen={"after": 0.5, "lambda_mask": 5.0, "area_max": 0.2,
                                                             "lambda_tail": 2.0}))
    _trainer(tmp_path, max_steps=4, limit_train_batches=4, limit_val_batches=0, callbacks=[Probe()]).fit(
        model, _dm(tiny_voc))
    assert [step for step, *_ in seen] == [0, 1, 2, 3]
    for step, settings, out, plain in seen:
        sharp = step >= 2
        assert settings["lambda_mask"] == (5.0 if sharp else 0.1)
        assert settings["area_max"] == (0.2 if sharp else 0.3) and settings["lambda_ent"] == 1.0
        assert ("tail" in out) == sharp
        expected = plain["loss"] + (model.hparams.lambda_class * out["class"] if "class" in out else 0)
        assert torch.allclose(out["loss"], expected, atol=1e-6)
    # outside a run (no trainer) the module's own settings
    assert ExplainerModule(**tiny_explainer_kwargs(clf, sharpen={"after": 0.0, "lambda_tail": 1.0})
                           ).objective_settings()["lambda_tail"] == 0.0
    for bad, match in [({"lambda_mask": 1.0}, "'after'"), ({"after": 1.0}, "in \\[0, 1\\)"),
                       ({"after": 0.5, "lambda_foo": 1.0}, "unknown settings"),
                       ({"after": 0.5, "area_max": 0.001}, "area_min <= area_max")]:
        with pytest.raises(ValueError, match=match):
            ExplainerModule(**tiny_explainer_kwargs(clf, sharpen=bad))


def test_curve_term_is_ltx_curve_term_of_one_present_class_per_image(tiny_voc, clf):
    """``lambda_curve``: the term is, image by image, LTX's curve term of the mask logits of the class the class
    term picks (a loop of one-image calls of ``losses.curve_term``, averaged), and it adds ``lambda_curve`` times
    itself to the loss; images without a present class add nothing; a negative weight is refused."""
    from explainer import losses
    from explainer.explainers.explainer import pick_present

    pl.seed_everything(0)
    model = ExplainerModule(**tiny_explainer_kwargs(clf, lambda_curve=2.0)).eval()
    dm = _dm(tiny_voc)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    batch["labels"][0] = 0  # one image without a present class
    with torch.no_grad():
        out = model.compute_losses(batch)
        model.hparams.lambda_curve = 0.0
        base = model.compute_losses(batch)
        S, x, present = out["_S"], batch["image"], batch["labels"] > 0.5
        index = torch.as_tensor(batch.get("index", torch.arange(x.shape[0])))
        c = pick_present(present, index, 0)
        per_image = [losses.curve_term(model.explanandum, x[i:i + 1], S[i:i + 1, c[i]][:, None],
                                       torch.nn.functional.one_hot(c[i:i + 1], model.num_classes).float(),
                                       model.baseline).mean()
                     for i in range(x.shape[0]) if present[i].any()]
    assert 0 < len(per_image) < x.shape[0] and "curve" not in base
    assert torch.allclose(out["curve"], torch.stack(per_image).mean(), atol=1e-5)
    assert torch.allclose(out["loss"], base["loss"] + 2.0 * out["curve"], atol=1e-5)
    with pytest.raises(ValueError, match="lambda_curve"):
        ExplainerModule(**tiny_explainer_kwargs(clf, lambda_curve=-1.0))


def test_config_errors(tmp_path):
    from explainer.pipelines.train import train_cli

    with pytest.raises(SystemExit):
        train_cli(["fit", "--config", "configs/synthetic/explainer.yaml", "--model.init_args.no_such_key", "1"],
                  run=False)
    with pytest.raises(ValueError, match="baseline"):
        ExplainerModule(**tiny_explainer_kwargs(tiny_classifier(tmp_path / "c.safetensors"), baseline="grey"))


def test_wandb_offline_run_holds_metrics(tiny_voc, clf, tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    pl.seed_everything(0)
    model = ExplainerModule(**tiny_explainer_kwargs(clf))
    logger = WandbLogger(project="explainer-test", save_dir=str(tmp_path), offline=True)
    _trainer(tmp_path, logger=logger, log_every_n_steps=1).fit(model, _dm(tiny_voc))
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the offline run file (what `wandb sync` uploads) holds the history records: the
    # metric keys and the resolved hyper-parameters are stored as plain protobuf strings
    import time

    for _ in range(60):  # wandb's service process may still be flushing the file
        data = next(runs[0].glob("*.wandb")).read_bytes()
        if b"val/miou" in data:
            break
        time.sleep(0.5)
    for key in (b"val/loss", b"val/miou", b"train/loss_step", b"lambda_ent", b"area_max"):
        assert key in data, key
    panels = [str(p) for p in (runs[0] / "files" / "media" / "images").rglob("*.png")]
    assert any("masks" in p for p in panels)  # the mask panels
    assert any("least_trusted" in p for p in panels), panels  # and the least trusted masks of the validation


def test_least_trusted_panel_shows_the_lowest_trust_masks(trained, monkeypatch):
    """The panel's rows are the present-class masks of lowest trust (the plain score without a fitted model)."""
    from explainer.explainers.trust import trust_signals, uncalibrated_trust

    model, _, _ = trained
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 64, 64, generator=g)
    present = torch.zeros(4, model.num_classes, dtype=torch.bool)
    present[0, [0, 2]] = present[1, 1] = present[2, [1, 3]] = present[3, 0] = True
    with torch.no_grad():
        s = model.explain(x)
    seen = {}
    monkeypatch.setattr(model, "_log_panel", lambda x, s, present, key="masks": seen.update(x=x, present=present))
    monkeypatch.setattr(model, "_trainer", type("T", (), {"sanity_checking": False, "is_global_zero": True})())
    model._log_least_trusted(x, s, present, 2)
    chosen = [p.nonzero()[:, 0] for p in present]
    probs = model.explanandum.probabilities(model.explanandum(x))
    t = uncalibrated_trust(trust_signals(model, x, chosen, [s[i, c] for i, c in enumerate(chosen)], probs, ()))
    rows = torch.cat([torch.full((len(c),), i) for i, c in enumerate(chosen)])
    order = torch.argsort(t, stable=True)[:2]
    assert torch.equal(seen["x"], x[rows[order]])
    assert seen["present"].nonzero()[:, 1].tolist() == torch.cat(chosen)[order].tolist()


@pytest.mark.parametrize("cfg", ["configs/synthetic/explainer.yaml", "configs/voc/explainer.yaml",
                                 "configs/voc/explainer_light.yaml",
                                 "configs/coco/explainer.yaml", "configs/imagenet/explainer.yaml",
                                 "configs/synthetic/explanandum.yaml"])
def test_configs_parse(cfg):
    """Every shipped config type-checks against the classes it names (without building models or data)."""
    from explainer.pipelines.train import check_config

    check_config(cfg)


@pytest.mark.parametrize("cfg,classes", [("configs/voc/explainer.yaml", 20), ("configs/voc/explainer_light.yaml", 20),
                                         ("configs/coco/explainer.yaml", 80),
                                         ("configs/imagenet/explainer.yaml", 1000)])
def test_real_data_configs_build_their_model(cfg, classes):
    """The GPU configs' model, built as written with a randomly initialised ResNet-50 of the dataset's class count
    in place of the trained classifier file: the encoder is initialised from it and explains 224-px images (one
    class of 1000, or all of 20 and 80)."""
    import yaml

    from explainer.explanandum import load_explanandum

    conf = yaml.safe_load(open(cfg))
    assert conf["trainer"]["sync_batchnorm"] and conf["trainer"]["devices"] == -1
    torch.manual_seed(0)
    f = load_explanandum("timm:resnet50", num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
                         multilabel=classes < 1000)
    model = ExplainerModule(**{**conf["model"]["init_args"], "explanandum": f}).eval()
    enc = dict(model.net.encoder.named_parameters())
    stem = next(k for k in enc if k.endswith("conv1.weight"))
    assert torch.equal(enc[stem], dict(f.model.named_parameters())["conv1.weight"])
    x = torch.rand(1, 3, 224, 224)
    m = model.explain(x, [classes - 1]) if classes == 1000 else model.explain(x)
    assert m.shape == ((1, 1, 224, 224) if classes == 1000 else (1, classes, 224, 224)) and torch.isfinite(m).all()


def test_check_config_rejects_unknown_keys(tmp_path):
    from explainer.pipelines.train import check_config

    bad = tmp_path / "bad.yaml"
    bad.write_text(open("configs/synthetic/explainer.yaml").read().replace("lambda_tv:", "lambda_tvv:"))
    with pytest.raises(ValueError, match="lambda_tvv"):
        check_config(bad)


def test_bf16_mixed_trains_and_explains(tiny_voc, clf, tmp_path):
    """precision bf16-mixed on the CPU (the quickstart config's option): the autocast loss of the config's
    architecture (FPN, convex upsampling, surround fill) is the fp32 loss up to bf16 rounding; a bf16 fit keeps
    fp32 weights, finite, and its explainer gives masks in [0, 1] that load back from the checkpoint."""
    kw = tiny_explainer_kwargs(clf, architecture="FPN", decoder_kwargs={"decoder_pyramid_channels": 32,
                               "decoder_segmentation_channels": 32}, upsampling="convex", inverse_fill="surround",
                               lambda_class=1.0)
    torch.manual_seed(0)
    model = ExplainerModule(**kw)
    ref = ExplainerModule(**kw)
    ref.load_state_dict(model.state_dict())
    dm = _dm(tiny_voc)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.compute_losses(batch)
        full = ref.compute_losses(batch)
    # the classifier's terms within 3 %; the mask terms, through the untrained network's bf16 convolutions (logits
    # of a few units, rounded at about 0.4 % a layer), within 10 %
    for k, rel in (("cls", 0.03), ("ent", 0.03), ("area", 0.1), ("mask", 0.1), ("loss", 0.1)):
        assert abs(float(low[k]) - float(full[k])) <= rel * abs(float(full[k])) + 0.01, (k, low[k], full[k])
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    _trainer(tmp_path, precision="bf16-mixed", callbacks=[ck], enable_checkpointing=True).fit(model, dm)
    changed = any(not torch.equal(a, b) for a, b in zip(model.net.parameters(), ref.net.parameters()))
    assert changed and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.net.parameters())
    m = load(tmp_path / "ck" / "last.ckpt").explain(torch.rand(2, 3, 64, 64))
    assert m.dtype == torch.float32 and torch.isfinite(m).all() and 0 <= m.min() and m.max() <= 1
