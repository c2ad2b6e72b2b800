"""Real classifiers at real sizes, end to end: timm ResNet-50, ConvNeXt-T and ViT-S/16 and torchvision's ResNet-50
as explananda at 224 px with 20 classes, each through the whole path a user takes (one test class, every
architecture through it, as smp and timm test their model zoos).

Random weights and a tiny generated VOC tree (nothing is downloaded): the assertions are about the path (the
runs go through, resume exactly, and every way out of the project gives the masks of ``explain``), not about
the masks' quality. Per architecture: ``fit`` the Explainer with the VOC config's settings and the paper's
network for that classifier (``architecture: auto``: DeepLabV3+ on its own backbone, DPT for the ViT), stop
it after one step and resume it to the result of an uninterrupted run; ``fit`` LTX; ``explain`` and
``finetune`` from the command line; ``attribute`` over 2 processes; ONNX export with parity; one served request.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from helpers import free_port, minmax_per_map, stop, wait_healthy
from PIL import Image

import explainer
from explainer import cli
from explainer.data import synthetic
from explainer.data.images import read_image
from explainer.explainers.cache import MapCache
from explainer.explainers.export import export
from explainer.pipelines.attribute import attribute
from explainer.serving import decode_mask

ROOT = Path(__file__).resolve().parents[2]
SIZE, NUM_CLASSES = 224, 20
ARCHITECTURES = ["timm:resnet50", "torchvision:resnet50", "timm:convnext_tiny", "timm:vit_small_patch16_224"]
NETWORKS = {"timm:resnet50": ("DeepLabV3Plus", "tu-resnet50"), "torchvision:resnet50": ("DeepLabV3Plus", "resnet50"),
            "timm:convnext_tiny": ("DeepLabV3Plus", "tu-convnext_tiny"),
            "timm:vit_small_patch16_224": ("DPT", "tu-vit_small_patch16_224")}
CLASS_NAMES = list(synthetic.CLASSES) + [f"extra{i}" for i in range(NUM_CLASSES - len(synthetic.CLASSES))]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A 10-image synthetic VOC tree (64 px, read at 224), its 8 shape classes among 20 names."""
    root = tmp_path_factory.mktemp("real") / "VOC2007"
    synthetic.generate(root, {"train": 4, "val": 2, "test": 4}, seed=3, image_size=64)
    return root


def _data(tree: Path) -> dict:
    return {"class_path": "explainer.data.VOCDataModule",
            "init_args": {"root": str(tree), "class_names": CLASS_NAMES, "image_size": SIZE, "batch_size": 2,
                          "num_workers": 0}}


def _fit_config(path: Path, model: dict, tree: Path, out: Path, max_steps: int, val_batches: int = 1) -> Path:
    """A training config as a user writes one: a checkpoint every optimiser step (all kept), ``val_batches``
    validation batches."""
    conf = {"seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "limit_val_batches": val_batches,
                        "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                        "logger": False, "default_root_dir": str(out),
                        "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": str(out / "checkpoints"), "every_n_train_steps": 1,
                                                     "save_top_k": -1, "filename": "{step}", "save_last": True}}]},
            "model": model, "data": _data(tree)}
    path.write_text(yaml.safe_dump(conf))
    return path


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="class", params=ARCHITECTURES, ids=lambda s: s.split(":")[1] + "-" + s.split(":")[0])
def run(request, tree, tmp_path_factory):
    """The classifier saved as a project checkpoint, and the Explainer config of configs/voc/explainer.yaml with
    it; the later steps reuse what the earlier ones trained."""
    spec = request.param
    d = tmp_path_factory.mktemp(spec.replace(":", "_"))
    torch.manual_seed(0)
    f = explainer.load_explanandum(spec, num_classes=NUM_CLASSES, class_names=CLASS_NAMES, multilabel=True)
    clf = explainer.save_explanandum(f, d / "classifier.safetensors")
    voc = yaml.safe_load((ROOT / "configs" / "voc" / "explainer.yaml").read_text())["model"]
    voc["init_args"].update(explanandum=str(clf), architecture="auto", encoder="auto", log_images=0)
    return {"spec": spec, "dir": d, "clf": clf, "model": voc}


@pytest.mark.usefixtures("tree")
class TestRealArchitecture:
    def test_fit_resume_and_paper_network(self, run, tree):
        """Two steps in one run, and a run resumed from that run's checkpoint after one step (what a run killed
        then would have left) to two: the same weights (buffers included)."""
        d = run["dir"]
        cfg = _fit_config(d / "full.yaml", run["model"], tree, d / "full", 2)
        assert cli.main(["fit", "--config", str(cfg)]) == 0
        part = d / "full" / "checkpoints" / "step=1.ckpt"
        assert torch.load(part, map_location="cpu", weights_only=True)["global_step"] == 1
        cfg = _fit_config(d / "resume.yaml", run["model"], tree, d / "resumed", 2, val_batches=0)
        assert cli.main(["fit", "--config", str(cfg), "--ckpt_path", str(part)]) == 0
        full, resumed = (_state(d / "full" / "checkpoints" / "last.ckpt"),
                         _state(d / "resumed" / "checkpoints" / "last.ckpt"))
        assert not all(torch.equal(full[k], v) for k, v in _state(part).items())  # the second step changed them
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.allclose(full[k].float(), resumed[k].float(), atol=1e-6), k
        start = explainer.load_explanandum(run["clf"]).model.state_dict()
        kept = {k: full[f"explanandum.model.{k}"] for k in start if f"explanandum.model.{k}" in full}
        assert all(torch.equal(v, start[k]) for k, v in kept.items())  # the explanandum stays frozen
        e = explainer.load(d / "full" / "checkpoints" / "last.ckpt")
        arch, enc = NETWORKS[run["spec"]]
        assert type(e.net).__name__ == arch and e.net.encoder is not None
        # the paper's network starts from the classifier: its first weights were the classifier's
        first = next(k for k, v in start.items() if v.dim() == 4)
        fresh = explainer.explainers.ExplainerModule(**{**run["model"]["init_args"], "explanandum": str(run["clf"])})
        ours = {k.replace("_", "."): v for k, v in dict(getattr(fresh.net.encoder, "model", fresh.net.encoder)
                                                          .state_dict()).items()}
        assert torch.equal(ours[first.replace("_", ".")], start[first]), (enc, first)
        run["explainer"] = d / "full" / "checkpoints" / "last.ckpt"

    def test_explain_verb_gives_the_class_selective_masks(self, run, tree, tmp_path, capsys):
        """``explain --top-k 5`` writes the masks of explanation(top_k=5), which equal the all-class masks at
        those classes (the last layer sliced to them)."""
        ckpt = run["explainer"]
        files = sorted((tree / "JPEGImages").glob("*.jpg"))[:2]
        folder = tmp_path / "in"
        folder.mkdir()
        for p in files:
            (folder / p.name).write_bytes(p.read_bytes())
        rc = cli.main(["explain", "--checkpoint", str(ckpt), "--images", str(folder), "--out", str(tmp_path / "out"),
                       "--top-k", "5", "--size", str(SIZE)])
        assert rc == 0, capsys.readouterr().err
        report = json.loads((tmp_path / "out" / "explanations.json").read_text())
        e = explainer.load(ckpt)
        for p in files:
            x = read_image(p)
            ex = e.explanation([x], top_k=5, size=SIZE)
            entry = report[p.name]["top_classes"]
            assert [c["index"] for c in entry] == ex.classes[0].tolist()
            assert all(0 <= c["trust"] <= 1 for c in entry)
            full = e.explanation([x], size=SIZE).masks[0]  # every class
            assert torch.allclose(ex.masks[0], full[ex.classes[0]], atol=1e-5)
            for j, c in enumerate(entry):
                png = np.asarray(Image.open(tmp_path / "out" / f"{p.stem}_jpg_{c['class']}_mask.png"))
                assert np.abs(png.astype(int) - (ex.masks[0][j].numpy() * 255).round()).max() <= 1

    def test_onnx_export_matches(self, run, tmp_path):
        import onnxruntime as ort

        e = explainer.load(run["explainer"])
        x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        ref = e.explain(x)
        path = export(run["explainer"], "onnx", tmp_path / "e.onnx", input_size=SIZE)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for b in (1, 2):
            out = sess.run(None, {sess.get_inputs()[0].name: x[:b].numpy()})[0]
            assert out.shape == (b, NUM_CLASSES, SIZE, SIZE)
            assert np.abs(out - ref[:b].numpy()).max() < 1e-4

    def test_attribute_over_two_processes(self, run, tree, tmp_path):
        """Two DDP processes write the Explainer's masks of every (image, present class) of the split."""
        data = tmp_path / "data.yaml"
        data.write_text(json.dumps({"data": _data(tree)}))
        man = attribute("explainer", str(data), "test", tmp_path / "cache",
                        options={"checkpoint": str(run["explainer"])}, explanandum=str(run["clf"]), shard_size=2,
                        progress=False,
                        trainer={"devices": 2, "strategy": "ddp_spawn"})
        assert man["num_shards"] == 2
        e = explainer.load(run["explainer"])
        dm = explainer.data.VOCDataModule(**_data(tree)["init_args"])
        ds = dm.dataset("test", train_transform=False)
        cache = MapCache(tmp_path / "cache", fingerprint=man["explanandum"]["fingerprint"])
        checked = 0
        for i in range(len(ds)):
            s = ds[i]
            present = (s["labels"] > 0.5).nonzero().flatten()
            if not len(present):
                continue
            classes, maps = cache.get(s["id"])
            assert classes.tolist() == present.tolist()
            maps = maps.float()
            ref = e.explain(s["image"][None].expand(len(present), -1, -1, -1), present)[:, 0]
            ref = minmax_per_map(ref)
            assert maps.shape == ref.shape and (maps - ref).abs().max() < 2e-3
            checked += 1
        assert checked > 0

    def test_ltx_fit_and_finetune(self, run, tree, tmp_path, capsys):
        """LTX (the official backbone network: a copy of the classifier with a light decoder) fits a step;
        ``finetune`` changes its masks and writes them as ``explain`` does."""
        model = {"class_path": "explainer.explainers.LTXModule",
                 "init_args": {"explanandum": str(run["clf"]), "network": "backbone", "lambda_mask": 50.0,
                               "lr": 2e-3, "log_images": 0}}
        cfg = _fit_config(tmp_path / "ltx.yaml", model, tree, tmp_path / "ltx", 1)
        assert cli.main(["fit", "--config", str(cfg)]) == 0
        ckpt = tmp_path / "ltx" / "checkpoints" / "last.ckpt"
        out = tmp_path / "ft"
        rc = cli.main(["finetune", "--checkpoint", str(ckpt), "--voc_root", str(tree), "--split", "test", "--limit",
                       "1", "--steps", "1", "--batch_size", "1", "--size", str(SIZE), "--out", str(out),
                       "--progress", "false"])
        assert rc == 0, capsys.readouterr().err
        report = json.loads((out / "explanations.json").read_text())
        (name, entry), = report.items()
        c = entry["top_classes"][0]
        finetuned = np.asarray(Image.open(out / f"{Path(name).stem}_jpg_{c['class']}_mask.png")).astype(int)
        e = explainer.load(ckpt)
        pre = e.explanation([read_image(tree / "JPEGImages" / name)], classes=[c["index"]], size=SIZE, trust=False)
        pre = (pre.masks[0][0].numpy() * 255).round()
        assert finetuned.shape == pre.shape and np.abs(finetuned - pre).max() > 2

    def test_one_served_request(self, run, tree, tmp_path):
        """``python -m explainer serve`` of the exported Explainer answers one request with explanation()'s masks."""
        st = export(run["explainer"], "safetensors", tmp_path / "e.safetensors")
        port, log = free_port(), tmp_path / "server.log"
        cmd = [sys.executable, "-m", "explainer", "serve", "--checkpoint", str(st), "--host", "127.0.0.1",
               "--port", str(port), "--threads", "1", "--log-level", "warning"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        path = sorted((tree / "JPEGImages").glob("*.jpg"))[0]
        try:
            wait_healthy(proc, url, log)
            r = httpx.post(url + "/predict", timeout=300, json={"image": base64.b64encode(path.read_bytes()).decode(),
                                                                 "top_k": 3, "format": "npy"})
        finally:
            stop(proc)
        assert r.status_code == 200, r.text
        ans = r.json()
        e = explainer.load(st).explanation([read_image(path)], top_k=3)
        assert [m["index"] for m in ans["masks"]] == e.classes[0].tolist()
        for j, m in enumerate(ans["masks"]):
            assert np.abs(decode_mask(m["mask"]) - e.masks[0][j].numpy()).max() < 2e-3
