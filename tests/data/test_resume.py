"""Exact resumption: a run stopped at any moment and resumed from its last checkpoint ends with the weights and
validation metrics of an uninterrupted run, with worker processes, dropout (the FPN decoder's Dropout2d) and DDP.

The reference is always an uninterrupted run of the same configuration; two of those are bit-identical.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import tiny_classifier
from pytorch_lightning.callbacks import ModelCheckpoint

from explainer.classifier import ClassifierModule
from explainer.data import VOCDataModule, synthetic
from explainer.data.base import EpochSeededSampler
from explainer.explainers import ExplainerModule

ROOT = Path(__file__).resolve().parents[2]
BATCH, N_TRAIN = 4, 20
BATCHES = N_TRAIN // BATCH  # training batches per epoch
EPOCHS = 3
TOL = 1e-6
# an FPN (its decoder has Dropout2d) over the tiny encoder, the per-class term (pick_present), a cosine schedule
MODEL = dict(architecture="FPN", encoder="tu-explainer_resnet_tiny", lambda_class=1.0, lr=1e-3,
             decoder_kwargs={"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
             lr_schedule="cosine", warmup_steps=1, log_images=0, area_min=0.01, area_max=0.1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = synthetic.generate(tmp / "voc", {"train": N_TRAIN, "val": 8, "test": 4}, seed=0, image_size=32)
    return data, tiny_classifier(tmp / "clf.safetensors")


def _weights(state_dict):
    return {k.removeprefix("state_dict."): v for k, v in state_dict.items()}


def _assert_same(a: dict, b: dict, what: str):
    """Every entry (weights and buffers: BN running statistics, counters) equal within TOL."""
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=TOL, rtol=0), \
            f"{what}: {k} differs by {(a[k].double() - b[k].double()).abs().max().item():.3g}"


# ---- in-process runs: every kind of checkpoint --------------------------------------------------------------------

def _module(clf):
    pl.seed_everything(0)
    return ExplainerModule(explanandum=str(clf), **MODEL)


def _classifier(clf):
    pl.seed_everything(0)
    return ClassifierModule(arch="explainer_resnet_tiny", num_classes=8, model_kwargs={"drop_rate": 0.3})


def _fit(tmp, assets, workers=1, ckpt_path=None, callbacks=(), epochs=2, module=_module):
    data, clf = assets
    model = module(clf)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp,
                         callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
    dm = VOCDataModule(root=str(data), image_size=32, batch_size=BATCH, num_workers=workers, rotate90=True)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model.state_dict(), float(trainer.callback_metrics["val/loss"])


def _every_step(dirpath):
    return [ModelCheckpoint(dirpath=dirpath, every_n_train_steps=1, save_top_k=-1, filename="{step}"),
            ModelCheckpoint(dirpath=dirpath, save_top_k=-1, filename="end-{epoch}")]


@pytest.mark.slow
def test_num_workers_do_not_change_the_result(assets, tmp_path):
    ref, ref_loss = _fit(tmp_path / "w1", assets, workers=1)
    other, other_loss = _fit(tmp_path / "w0", assets, workers=0)
    _assert_same(ref, other, "num_workers 0 against 1")
    assert abs(ref_loss - other_loss) <= TOL


@pytest.fixture(scope="module")
def every_step(assets, tmp_path_factory):
    """An uninterrupted 2-epoch run that wrote a checkpoint after every step and every epoch."""
    tmp = tmp_path_factory.mktemp("every_step")
    ref, ref_loss = _fit(tmp / "run", assets, callbacks=_every_step(tmp / "ck"))
    return tmp / "ck", ref, ref_loss


CASES = {"mid-epoch": ("step=2", 1),                     # step 2 of 5 in epoch 0
         "last-batch-of-epoch": ("step=5", 1),           # saved at the batch end, before validation
         "epoch-end": ("end-epoch=0", 1),                # saved after validation
         "epoch-end-0-workers": ("end-epoch=0", 0),      # no worker: the dropout draws alone
         "mid-epoch-then-0-workers": ("step=7", 0),      # resumed with another worker count
         "mid-epoch-then-2-workers": ("step=3", 2)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resume_from_every_kind_of_checkpoint(assets, every_step, tmp_path, case):
    ck, ref, ref_loss = every_step
    name, workers = CASES[case]
    assert (ck / f"{name}.ckpt").is_file()
    got, loss = _fit(tmp_path, assets, workers=workers, ckpt_path=str(ck / f"{name}.ckpt"))
    _assert_same(ref, got, case)
    assert abs(loss - ref_loss) <= TOL, (loss, ref_loss)


@pytest.mark.slow
def test_resume_twice_in_one_epoch(assets, every_step, tmp_path):
    """A resumed run stopped again in the same epoch: its own checkpoints resume exactly too."""
    ck, ref, ref_loss = every_step
    _fit(tmp_path / "c", assets, ckpt_path=str(ck / "step=6.ckpt"), callbacks=_every_step(tmp_path / "ck2"))
    got, loss = _fit(tmp_path / "d", assets, ckpt_path=str(tmp_path / "ck2" / "step=8.ckpt"))
    _assert_same(ref, got, "resumed twice in epoch 1")
    assert abs(loss - ref_loss) <= TOL


@pytest.mark.slow
def test_classifier_resumes_mid_epoch(assets, tmp_path):
    """The classifier module (another base class, dropout before its head, a one-cycle schedule) resumes too."""
    ref, ref_loss = _fit(tmp_path / "full", assets, module=_classifier, callbacks=_every_step(tmp_path / "ck"))
    got, loss = _fit(tmp_path / "b", assets, module=_classifier, ckpt_path=str(tmp_path / "ck" / "step=7.ckpt"))
    _assert_same(ref, got, "classifier resumed at step 7")
    assert abs(loss - ref_loss) <= TOL


# ---- the sampler's state --------------------------------------------------------------------------------------------

def test_sampler_state_resumes_the_epoch_it_belongs_to():
    def items(s, epoch):
        s.set_epoch(epoch)
        return list(s)

    s = EpochSeededSampler(10, seed=3, num_replicas=2, rank=1)
    full = items(s, 4)
    it = iter(s)
    head = [next(it) for _ in range(2)]
    state = s.state_dict()
    assert state["epoch"] == 4 and state["yielded"] == 2
    fresh = EpochSeededSampler(10, seed=3, num_replicas=2, rank=1)
    fresh.load_state_dict(state)
    assert head + items(fresh, 4) == full  # the same epoch continues where it stopped
    fresh.load_state_dict(state)
    assert items(fresh, 5) == items(EpochSeededSampler(10, seed=3, num_replicas=2, rank=1), 5)  # a later one: afresh
    other = EpochSeededSampler(12, seed=3, num_replicas=2, rank=1)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="n: .*n=12.*n=10"):
        items(other, 4)
    with pytest.raises(ValueError, match="state_dict: expected a dict with 'epoch' and 'yielded'"):
        s.load_state_dict({"epoch": 1})


# ---- real processes, killed with SIGKILL ----------------------------------------------------------------------------

def _config(run: Path, assets, workers: int, devices: int = 1) -> Path:
    data, clf = assets
    checkpoint = "pytorch_lightning.callbacks.ModelCheckpoint"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": EPOCHS, "accelerator": "cpu", "devices": devices,
            "strategy": "ddp" if devices > 1 else "auto", "default_root_dir": str(run),
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run), "name": "logs"}},
            # as the shipped configs: the monitored checkpoint and `last` at each epoch end, plus a `last`
            # every 2 steps; `--ckpt_path last` takes the newer
            "callbacks": [
                {"class_path": checkpoint, "init_args": {"dirpath": str(run / "checkpoints"), "monitor": "val/loss",
                                                         "mode": "min", "save_last": True, "filename": "best"}},
                {"class_path": checkpoint, "init_args": {"dirpath": str(run / "checkpoints" / "steps"),
                                                         "every_n_train_steps": 2, "save_top_k": 0,
                                                         "save_last": True}},
                {"class_path": "slow_steps.SlowSteps"}]},
        "model": {"class_path": "explainer.explainers.ExplainerModule",
                  "init_args": {"explanandum": str(clf), **MODEL}},
        "data": {"class_path": "explainer.data.VOCDataModule",
                 "init_args": {"root": str(data), "image_size": 32, "batch_size": BATCH // devices,
                               "num_workers": workers, "rotate90": True}}}
    run.mkdir(parents=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(config: Path, *args: str, slow: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, SLOW_STEPS_SECONDS=str(slow), HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               NO_ALBUMENTATIONS_UPDATE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    log = open(config.parent / "train.log", "ab")
    # its own process group: the kill reaches the DDP rank and the loader workers too
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config), *args],
                            cwd=config.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _train(config: Path, *args: str) -> None:
    p = _start(config, *args)
    if p.wait(timeout=600) != 0:
        raise AssertionError((config.parent / "train.log").read_text()[-3000:])


def _kill_mid_epoch(config: Path) -> dict:
    """Start a slowed-down run, SIGKILL it as soon as it wrote a step checkpoint; the checkpoint it left."""
    p = _start(config, slow=1.0)  # 3 s between the first step checkpoint (step 2) and the epoch end (step 5)
    step_last = config.parent / "checkpoints" / "steps" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not step_last.is_file() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL, (config.parent / "train.log").read_text()[-3000:]
    lasts = [f for f in (config.parent / "checkpoints").rglob("last.ckpt")]
    ck = torch.load(max(lasts, key=lambda f: f.stat().st_mtime), map_location="cpu", weights_only=True)
    assert 0 < ck["global_step"] < EPOCHS * BATCHES and ck["global_step"] % BATCHES, ck["global_step"]  # mid-epoch
    return ck


def _final(run: Path) -> tuple[dict, float]:
    """The finished run's weights (its last epoch-end checkpoint) and its last logged val/loss."""
    ck = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == EPOCHS - 1 and ck["global_step"] == EPOCHS * BATCHES, (ck["epoch"], ck["global_step"])
    logs = sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda f: int(f.parent.name.split("_")[1]))
    rows = [r for r in csv.DictReader(logs[-1].open()) if r.get("val/loss")]
    assert int(rows[-1]["epoch"]) == EPOCHS - 1
    return _weights(ck["state_dict"]), float(rows[-1]["val/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["one-process", "ddp-2-processes"])
def test_kill_9_mid_epoch_then_resume_last(assets, tmp_path, devices):
    """`kill -9` of `train.py fit` (1 loader worker per process) mid-epoch; `--ckpt_path last` ends as the
    uninterrupted run: all weights and buffers, and the final val/loss."""
    full = _config(tmp_path / "full", assets, workers=1, devices=devices)
    _train(full)
    ref, ref_loss = _final(tmp_path / "full")

    killed = _config(tmp_path / "killed", assets, workers=1, devices=devices)
    _kill_mid_epoch(killed)
    _train(killed, "--ckpt_path", "last")
    got, loss = _final(tmp_path / "killed")
    _assert_same(ref, got, f"resumed after kill -9, devices={devices}")
    assert abs(loss - ref_loss) <= TOL, (loss, ref_loss)
