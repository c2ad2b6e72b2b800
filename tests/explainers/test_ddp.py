"""DDP on the CPU: 2 gloo processes follow one process's loss trajectory on the same global batch."""

import json

import pytest
import pytorch_lightning as pl
import torch
from helpers import tiny_classifier, tiny_explainer_kwargs

from explainer.data import VOCDataModule
from explainer.explainers import ExplainerModule


class RecordLoss(pl.Callback):
    """Rank 0 appends the global mean training loss of each step to a JSON file."""

    def __init__(self, path):
        self.path = str(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = pl_module.all_gather(outputs["loss"].detach()).float().mean()
        if trainer.is_global_zero:
            try:
                with open(self.path) as fh:
                    seq = json.load(fh)
            except FileNotFoundError:
                seq = []
            seq.append(float(loss))
            with open(self.path, "w") as fh:
                json.dump(seq, fh)


def _run(tmp_path, tiny_voc, clf, devices, batch):
    pl.seed_everything(0)
    # per-sample normalisation (torch's SyncBatchNorm is GPU-only): the 2-process run then computes
    # exactly what one process computes on the same global batch
    per_sample_norm = {"decoder_channels": [32, 16, 16, 8, 8], "norm_layer": "groupnorm1",
                       "decoder_use_norm": {"type": "instancenorm", "affine": True}}
    model = ExplainerModule(**tiny_explainer_kwargs(clf, lambda_class=1.0, decoder_kwargs=per_sample_norm))
    dm = VOCDataModule(root=str(tiny_voc), image_size=64, batch_size=batch, num_workers=0)
    out = tmp_path / f"loss_{devices}.json"
    kw = dict(strategy="ddp_spawn") if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         callbacks=[RecordLoss(out)], **kw)
    trainer.fit(model, dm)
    return json.loads(out.read_text()), trainer.callback_metrics


@pytest.mark.slow
def test_two_processes_follow_one(tmp_path, tiny_voc):
    clf = tiny_classifier(tmp_path / "clf.safetensors")
    single, _ = _run(tmp_path, tiny_voc, clf, devices=1, batch=8)
    double, metrics = _run(tmp_path, tiny_voc, clf, devices=2, batch=4)
    assert len(single) == len(double) == 4
    # same global batches (the sampler shards the single-process order) and averaged
    # gradients: the same trajectory up to float reduction order
    for a, b in zip(single, double):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(a)), (single, double)
    assert single[0] != single[-1]  # it trained
    assert "val/loss" in metrics and torch.isfinite(metrics["val/loss"])  # synced metrics came back
