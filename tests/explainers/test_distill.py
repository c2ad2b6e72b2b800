"""The distill kind: map losses against plain formulas, a student learning a cached teacher, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import TINY_DECODER, tiny_classifier
from PIL import Image

import explainer
from explainer import losses
from explainer.data import VOCDataModule, synthetic
from explainer.explainers import DistillModule
from explainer.explainers.distill import joint_augment
from explainer.explainers.export import export_onnx, export_safetensors
from explainer.pipelines.attribute import attribute


@pytest.fixture(scope="module")
def setup(tiny_voc, tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    clf = str(tiny_classifier(d / "tiny.safetensors"))
    data = {"class_path": "explainer.data.VOCDataModule",
            "init_args": {"root": str(tiny_voc), "image_size": 64, "num_workers": 0}}
    (d / "data.yaml").write_text(json.dumps({"data": data}))
    for split in ("train", "val"):
        attribute("gradcam", str(d / "data.yaml"), split, d / f"cache_{split}", explanandum=clf, shard_size=8,
                  progress=False)
    return d, clf


def student(clf, d, **kw):
    args = dict(explanandum=clf, teacher_cache=[str(d / "cache_train"), str(d / "cache_val")], architecture="Unet",
                encoder="tu-explainer_resnet_tiny", decoder_kwargs=TINY_DECODER, lr=3e-3, lr_schedule="constant",
                channels_last=False)
    args.update(kw)
    return DistillModule(**args)


def test_map_losses_equal_plain_formulas():
    torch.manual_seed(0)
    z, t = torch.randn(3, 5, 6), torch.rand(3, 5, 6)
    bce = -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z))).mean()
    assert torch.allclose(losses.map_distillation_loss(z, t, "bce"), bce, atol=1e-6)
    kl = 0.0
    for i in range(3):
        p = torch.exp(t[i].flatten() / 0.2) / torch.exp(t[i].flatten() / 0.2).sum()
        q = torch.exp(z[i].flatten()) / torch.exp(z[i].flatten()).sum()
        kl += float((p * torch.log(p / q)).sum()) / 3
    assert abs(float(losses.map_distillation_loss(z, t, "kl", temperature=0.2)) - kl) < 1e-5
    g = torch.Generator().manual_seed(3)
    got = losses.map_distillation_loss(z, t, "rank", pairs=7, margin=0.1, generator=g)
    g = torch.Generator().manual_seed(3)
    i = torch.randint(0, 30, (3, 7), generator=g)
    j = torch.randint(0, 30, (3, 7), generator=g)
    num, den = 0.0, 0
    for r in range(3):
        for a, b in zip(i[r].tolist(), j[r].tolist()):
            dt = float(t[r].flatten()[a] - t[r].flatten()[b])
            if abs(dt) > 0.1:
                num += float(F.softplus(-(z[r].flatten()[a] - z[r].flatten()[b]) * (1 if dt > 0 else -1)))
                den += 1
    assert abs(float(got) - num / max(den, 1)) < 1e-5
    with pytest.raises(ValueError, match="map_loss"):
        losses.map_distillation_loss(z, t, "l2")


def test_joint_augment_moves_maps_with_images():
    x = torch.rand(4, 3, 16, 16)
    maps = [x[b, :1].clone() for b in range(4)]
    xa, ma = joint_augment(x, maps, torch.arange(4), step=5)
    for b in range(4):
        assert torch.equal(xa[b, :1], ma[b])
    assert not all(torch.equal(xa[b], x[b]) for b in range(4))  # some image was transformed
    again, _ = joint_augment(x, maps, torch.arange(4), step=5)
    assert torch.equal(again, xa)  # a function of (index, step) only


def test_student_learns_the_teacher_and_round_trips(setup, tiny_voc, tmp_path):
    d, clf = setup
    pl.seed_everything(0)
    model = student(clf, d)
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, batch_size=8, num_workers=0, augment=False)
    dm.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train", train_transform=False), batch_size=24)))

    def distance():
        """Mean absolute difference of the student's masks to the teacher's maps (BCE to soft targets has
        their entropy as its floor, so it is not the measure)."""
        model.eval()
        with torch.no_grad():
            masks = model.class_masks(batch["image"])
            teach = model.teacher_maps(batch)
            return float(torch.cat([(masks[i, c] - m).abs().flatten() for i, (c, m) in enumerate(teach)]).mean())

    before = distance()
    with_curve = student(clf, d, lambda_curve=0.5, curve_areas=(0.1, 0.3))
    with_curve.train()
    out = with_curve.compute_losses(batch)
    assert out["curve"] > 0 and torch.isclose(out["loss"], out["map"] + out["absent"] + 0.5 * out["curve"])
    tr = pl.Trainer(max_epochs=30, accelerator="cpu", logger=False, enable_progress_bar=False,
                    default_root_dir=tmp_path, log_every_n_steps=1,
                    callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)])
    tr.fit(model, dm)
    after = distance()
    assert after < 0.8 * before, (before, after)
    # the same module back from the checkpoint, an export and the methods interface
    x = batch["image"][:3]
    ref = model.eval().explain(x)
    loaded = explainer.load(tmp_path / "ck" / "last.ckpt")
    assert loaded.kind == "distill" and torch.allclose(loaded.explain(x), ref, atol=1e-6)
    exported = explainer.load(export_safetensors(loaded, tmp_path / "s.safetensors"))
    assert torch.allclose(exported.explain(x), ref, atol=1e-6)
    m = explainer.methods.get("distill", None, checkpoint=str(tmp_path / "s.safetensors"))
    assert torch.allclose(m.attribute(x, [1, 2, 3]), ref[torch.arange(3), [1, 2, 3]][:, None], atol=1e-6)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(export_onnx(loaded, tmp_path / "s.onnx", 64)),
                                providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - ref.numpy()).max() < 1e-4


def test_online_teacher_equals_the_cache(setup, tiny_voc):
    d, clf = setup
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, num_workers=0, augment=False)
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("val", train_transform=False), batch_size=12)))
    cached = student(clf, d).teacher_maps(batch)
    online = student(clf, d, teacher_cache=None, teacher="gradcam").teacher_maps(batch)
    for (c1, m1), (c2, m2) in zip(cached, online):
        assert torch.equal(c1, c2)
        assert (m1 - m2).abs().max() < 2e-3  # the cache stores fp16


def test_errors(setup, tiny_voc):
    d, clf = setup
    with pytest.raises(ValueError, match="map_loss"):
        student(clf, d, map_loss="l1")
    with pytest.raises(ValueError, match="lambda_curve"):
        student(clf, d, lambda_curve=-1)
    torch.manual_seed(5)
    other = explainer.save_explanandum(
        explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=len(synthetic.CLASSES),
                                   multilabel=True, class_names=list(synthetic.CLASSES)), d / "other.safetensors")
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, num_workers=0, augment=False)
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("test", train_transform=False), batch_size=2)))
    with pytest.raises(ValueError, match="another classifier"):
        student(str(other), d).teacher_maps(batch)
    with pytest.raises(KeyError, match="no maps for image"):
        student(clf, d).teacher_maps(batch)  # the test split was never attributed


def test_top_weighted_bce_equals_a_plain_loop():
    torch.manual_seed(1)
    z, t = torch.randn(3, 5, 6), torch.rand(3, 5, 6)
    want = 0.0
    for i in range(3):
        w = 1 + 4.0 * t[i]
        w = w / w.mean()
        p = torch.sigmoid(z[i])
        want += float((w * -(t[i] * torch.log(p) + (1 - t[i]) * torch.log(1 - p))).mean()) / 3
    assert abs(float(losses.map_distillation_loss(z, t, "bce", top_weight=4.0)) - want) < 1e-5
    plain = losses.map_distillation_loss(z, t, "bce")
    assert not torch.isclose(losses.map_distillation_loss(z, t, "bce", top_weight=4.0), plain)
    with pytest.raises(ValueError, match="top_weight"):
        losses.map_distillation_loss(z, t, "kl", top_weight=1.0)
    with pytest.raises(ValueError, match="top_weight"):
        losses.map_distillation_loss(z, t, "bce", top_weight=-1)


def test_explainer_term_is_the_explainers_own_loss_and_init_from_copies_a_network(setup, tiny_voc, tmp_path):
    from helpers import tiny_explainer_kwargs

    from explainer.explainers import ExplainerModule

    d, clf = setup
    torch.manual_seed(0)
    weights = dict(lambda_ent=0.7, lambda_tv=2.0, lambda_area=1.5, lambda_mask=0.2, lambda_nontarget=0.4)
    ex = ExplainerModule(**tiny_explainer_kwargs(clf, channels_last=False, **weights))
    path = export_safetensors(ex, tmp_path / "ex.safetensors")
    obj = dict(weights, area_min=0.01, area_max=0.1)
    only = student(clf, d, lambda_map=0.0, lambda_absent=0.0, lambda_explainer=1.0, explainer_objective=obj,
                   init_from=str(path))
    for k, v in ex.net.state_dict().items():
        assert torch.equal(only.net.state_dict()[k], v), k
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, num_workers=0, augment=False)
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train", train_transform=False), batch_size=6)))
    ex.eval(), only.eval()
    with torch.no_grad():
        want = ex.compute_losses(batch)
        got = only.compute_losses(batch)
    assert torch.isclose(got["loss"], want["loss"], atol=1e-6) and got["loss"] > 0
    for k in ("cls", "ent", "tv", "area", "mask", "nontarget"):
        assert torch.isclose(got[f"explainer_{k}"], want[k], atol=1e-6), k
    mixed = student(clf, d, lambda_explainer=0.5, explainer_objective=obj, init_from=str(path)).eval()
    with torch.no_grad():
        out = mixed.compute_losses(batch)
    assert torch.isclose(out["loss"], out["map"] + out["absent"] + 0.5 * want["loss"], atol=1e-6)
    # a student's checkpoint restores without the init_from file
    exported = export_safetensors(mixed, tmp_path / "mixed.safetensors")
    path.unlink()
    x = batch["image"][:2]
    assert torch.allclose(explainer.load(exported).explain(x), mixed.explain(x), atol=1e-6)


def test_init_from_and_objective_errors(setup, tmp_path):
    d, clf = setup
    other_net = export_safetensors(student(clf, d, architecture="FPN", decoder_kwargs=None),
                                   tmp_path / "fpn.safetensors")
    with pytest.raises(ValueError, match="another network"):
        student(clf, d, init_from=str(other_net))
    other_clf = tiny_classifier(tmp_path / "other.safetensors", seed=5)
    foreign = export_safetensors(student(str(other_clf), d), tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="another explanandum"):
        student(clf, d, init_from=str(foreign))
    with pytest.raises(FileNotFoundError, match="no such file"):
        student(clf, d, init_from=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown settings"):
        student(clf, d, explainer_objective={"lambda_tvv": 1.0})
    with pytest.raises(ValueError, match="lambda_explainer"):
        student(clf, d, lambda_explainer=-0.5)
    with pytest.raises(ValueError, match="map_top_weight"):
        student(clf, d, map_loss="kl", map_top_weight=2.0)


def test_curve_halves_add_up_to_the_whole_term(setup, tiny_voc):
    d, clf = setup
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, num_workers=0, augment=False)
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train", train_transform=False), batch_size=6)))
    got = {}
    for parts in ("both", "keep", "lose"):
        torch.manual_seed(0)
        m = student(clf, d, lambda_curve=1.0, curve_areas=(0.1, 0.3), curve_parts=parts).eval()
        with torch.no_grad():
            got[parts] = m.compute_losses(batch)["curve"]
    assert got["keep"] > 0 and got["lose"] > 0
    assert torch.isclose(got["both"], got["keep"] + got["lose"], atol=1e-6)
    with pytest.raises(ValueError, match="curve_parts"):
        student(clf, d, curve_parts="half")


def test_grid_smooth_equals_plain_block_means_and_bilinear_upsampling():
    from explainer.explainers.distill import grid_smooth

    torch.manual_seed(2)
    s = torch.rand(1, 1, 8, 12)
    got = grid_smooth(s, 2)[0, 0]
    ch, cw = 2, 3  # 2 cells along the shorter side, the longer in proportion: 4 x 4 pixel cells
    cells = [[float(s[0, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean()) for j in range(cw)] for i in range(ch)]

    def src(o, n_in, n_out):  # bilinear sampling, half-pixel centres (align_corners=False)
        p = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        i0 = int(p)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, p - i0

    for y in range(8):
        y0, y1, fy = src(y, ch, 8)
        for x in range(12):
            x0, x1, fx = src(x, cw, 12)
            top = cells[y0][x0] * (1 - fx) + cells[y0][x1] * fx
            bottom = cells[y1][x0] * (1 - fx) + cells[y1][x1] * fx
            assert abs(float(got[y, x]) - (top * (1 - fy) + bottom * fy)) < 1e-6, (y, x)
    assert torch.equal(grid_smooth(s, None), s)
    assert torch.allclose(grid_smooth(s, 8), s, atol=1e-6)  # one pixel per cell: unchanged


def test_output_grid_smooths_explain_and_export_but_not_training(setup, tiny_voc, tmp_path):
    from explainer.explainers.distill import grid_smooth

    d, clf = setup
    torch.manual_seed(0)
    plain = student(clf, d).eval()
    smooth = student(clf, d, output_grid=4).eval()
    smooth.load_state_dict(plain.state_dict())
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, num_workers=0, augment=False)
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("train", train_transform=False), batch_size=4)))
    x = batch["image"]
    want = grid_smooth(plain.explain(x), 4)
    assert torch.allclose(smooth.explain(x), want, atol=1e-6)
    assert not torch.allclose(plain.explain(x), want, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(smooth.compute_losses(batch)["loss"], plain.compute_losses(batch)["loss"])
    loaded = explainer.load(export_safetensors(smooth, tmp_path / "g.safetensors"))
    assert loaded.hparams.output_grid == 4 and torch.allclose(loaded.explain(x), want, atol=1e-6)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(export_onnx(loaded, tmp_path / "g.onnx", 64)), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - want.numpy()).max() < 1e-4
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="output_grid"):
            student(clf, d, output_grid=bad)


def test_distilled_method_overrides_the_recorded_grid(setup, tiny_voc, tmp_path):
    from explainer.explainers.distill import grid_smooth

    d, clf = setup
    torch.manual_seed(0)
    path = export_safetensors(student(clf, d, output_grid=4).eval(), tmp_path / "g.safetensors")
    x = torch.rand(2, 3, 64, 64)
    recorded = explainer.methods.get("distill", None, checkpoint=str(path))
    off = explainer.methods.get("distill", None, checkpoint=str(path), output_grid=0)
    other = explainer.methods.get("distill", None, checkpoint=str(path), output_grid=2)
    raw = off.attribute(x, [1, 2])
    assert torch.allclose(recorded.attribute(x, [1, 2]), grid_smooth(raw, 4), atol=1e-6)
    assert torch.allclose(other.attribute(x, [1, 2]), grid_smooth(raw, 2), atol=1e-6)
    with pytest.raises(ValueError, match="output_grid"):
        explainer.methods.get("distill", None, checkpoint=str(path), output_grid=-1)


@pytest.mark.parametrize("kind", ["distill", "ltx"])
def test_validation_panels_of_every_kind(kind, setup, tiny_voc, tmp_path):
    """A distilled student and LTX log the Explainer's validation panels too: the masks of the first images and
    the least trusted masks of the batch (PNG files beside a CSV log; W&B and TensorBoard get the same images)."""
    from pytorch_lightning.loggers import CSVLogger

    from explainer.explainers import LTXModule

    d, clf = setup
    pl.seed_everything(0)
    model = student(clf, d, log_images=2) if kind == "distill" else LTXModule(clf, log_images=2)
    logger = CSVLogger(str(tmp_path), name="logs")
    tr = pl.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_progress_bar=False,
                    enable_checkpointing=False, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0)
    tr.fit(model, VOCDataModule(root=str(tiny_voc), image_size=64, batch_size=8, num_workers=0))
    for key in ("masks", "least_trusted"):
        png = Path(logger.log_dir) / key / "epoch000.png"
        assert png.is_file(), key
        assert np.asarray(Image.open(png)).std() > 0  # a picture, not a blank
