"""Distillation: a one-pass explainer trained to reproduce any registered method's maps, for every class at once.

The student is the Explainer's network (any smp architecture and encoder, ``C`` mask maps from one forward
pass). For each training image and each class ``c`` the teacher explained, with teacher map ``T_c`` (min-max
normalised to [0, 1]) and student logits ``z_c``::

    L = l_map D(z_c, T_c) + l_absent BCE(z_a, 0) [+ l_curve L_curve(z_c)] [+ l_explainer L_explainer(z)]

* ``D`` (``map_loss``, :func:`explainer.losses.map_distillation_loss`): per-pixel BCE to the map, KL between
  spatial softmax distributions, or a pairwise ranking loss;
* the absent term pushes the maps of classes absent from the image (labels) to 0, so that one pass gives a
  meaningful map for every class, as the Explainer's non-target term does;
* ``L_curve`` (``lambda_curve`` > 0): the faithfulness term of LTX's finetuning: the soft top ``a`` of the map
  for each area ``a`` of ``curve_areas`` must keep class ``c`` and the image without it must lose it
  (:func:`explainer.losses.soft_top_area`), masking with the explainer's baseline; for one explained class
  per image and step (it costs two explanandum passes per area); ``curve_parts`` "keep" or "lose" keeps one
  half (what insertion reads, or what deletion reads);
* ``L_explainer`` (``lambda_explainer`` > 0): the Explainer's own objective on all the maps
  (:func:`explainer.explainers.explainer.explainer_objective`, its weights and area bounds in
  ``explainer_objective``; two explanandum passes per image).

``output_grid`` (g, optional) smooths the maps the student gives (``explain``, export, serving; not its
training): each mask is averaged over a grid of g cells along its shorter side and upsampled bilinearly, as
Grad-CAM's maps are by construction: the pixels ranked first then form connected regions. On validation images
it lowered the faithful explainer's deletion AUC, and 16 cells were chosen there (docs/DISTILLATION.md).

``init_from`` starts the network from a trained explainer's (a ``.ckpt`` or a safetensors export of the same
architecture): a student can be finetuned with other terms without training it again from the start.

The teacher's maps come from a cache written by ``python -m explainer attribute`` (``teacher_cache``, one folder
or several, e.g. the train and val splits; looked up by image id), or from a registered method run on each batch
(``teacher`` + ``teacher_options``; for cheap teachers). Augmentation (horizontal flip, 90-degree rotations) is
applied here to the image and its teacher maps together, seeded by (image index, step) so that a resumed run
repeats it: configure the datamodule with ``augment: false``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from explainer import losses
from explainer.core.maps import minmax_normalize, upsample
from explainer.explainers.base import TrainedExplainer, register_kind
from explainer.explainers.cache import MapCache
from explainer.explainers.explainer import check_explainer_objective, explainer_objective, pick_present, step_hash
from explainer.explainers.loading import read_meta
from explainer.losses import CURVE_AREAS, CURVE_PARTS, CURVE_TEMPERATURE
from explainer.methods.base import get as get_method
from explainer.nets.segmentation import build_mask_net


def joint_augment(x: torch.Tensor, maps: list[torch.Tensor], index: torch.Tensor, step: int,
                  rotate: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Flip and rotate each image and its maps alike; the choice is a hash of (dataset index, step) only."""
    key = step_hash(index.cpu(), step)
    xs, ms = [], []
    for b in range(x.shape[0]):
        k = int(key[b])
        xi, mi = x[b], maps[b]
        if k & 1:
            xi, mi = xi.flip(-1), mi.flip(-1)
        r = (k >> 1) % 4 if rotate and xi.shape[-1] == xi.shape[-2] else 0
        if r:
            xi, mi = torch.rot90(xi, r, (-2, -1)), torch.rot90(mi, r, (-2, -1))
        xs.append(xi)
        ms.append(mi)
    return torch.stack(xs), ms


def grid_smooth(s: torch.Tensor, grid: int | None) -> torch.Tensor:
    """Maps (B, K, H, W) averaged over a grid of ``grid`` cells along the shorter side (the longer side in
    proportion), then upsampled bilinearly to (H, W); None: unchanged."""
    if not grid:
        return s
    h, w = s.shape[-2:]
    short = min(h, w)
    cells = (max(1, round(grid * h / short)), max(1, round(grid * w / short)))
    return F.interpolate(F.adaptive_avg_pool2d(s, cells), size=(h, w), mode="bilinear", align_corners=False)


@register_kind("distill")
class DistillModule(TrainedExplainer):
    """A student explainer distilled from a teacher method's maps (see the module docstring).

    Args:
        explanandum: spec of the frozen classifier.
        teacher_cache: folder(s) of ``python -m explainer attribute`` with the teacher's maps of the training
            (and validation) images; or
        teacher, teacher_options: a registered method run on every batch (the present classes).
        architecture, encoder, encoder_weights, decoder_kwargs, init_encoder_from_explanandum: the network, as
            the Explainer's.
        init_from: a trained explainer (``.ckpt`` or ``.safetensors``) whose network weights start this one's
            (same architecture, encoder and classes); read when training starts from scratch, not on restoring.
        map_loss: "bce", "kl" or "rank"; kl_temperature, rank_pairs, rank_margin: their settings;
            map_top_weight: pixels weigh ``1 + w T`` in the BCE (errors on the teacher's top count more).
        lambda_map, lambda_absent, lambda_curve, lambda_explainer: weights of the terms; curve_areas,
            curve_temperature, curve_parts: the curve term's soft top areas, temperature and halves ("both",
            "keep", "lose"); explainer_objective: the Explainer objective's weights and area bounds
            (``lambda_ent``, ``lambda_tv``, ``lambda_area``, ``lambda_mask``, ``lambda_nontarget``, ``area_min``,
            ``area_max``; the Explainer's defaults).
        baseline: masking baseline of the curve term ("mean", "black", "blur").
        output_grid: None, or the number of cells (>= 1) along the shorter side over which the student's masks
            are averaged at inference (see the module docstring).
        augment, rotate: joint flips (and 90-degree rotations) of images and teacher maps.
        upsampling: "bilinear", "convex" or "convex_zero" (image-guided upsampling of the coarse masks, as the
            Explainer's).
        lr, weight_decay, optimizer, lr_schedule, warmup_steps, channels_last: see TrainedExplainer.
        log_images: rows of the validation panels (``val/masks``, ``val/least_trusted``; 0: none).
        explanandum_fingerprint: set when restoring.
    """

    def __init__(self, explanandum: str = "checkpoints/synthetic_classifier.safetensors",
                 teacher_cache: str | list[str] | None = None, teacher: str | None = None,
                 teacher_options: dict | None = None, architecture: str = "FPN",
                 encoder: str = "tu-explainer_resnet_small", encoder_weights: str | None = None,
                 decoder_kwargs: dict | None = None, init_encoder_from_explanandum: bool = True,
                 map_loss: str = "bce", kl_temperature: float = 0.1, rank_pairs: int = 1024,
                 rank_margin: float = 0.05, map_top_weight: float = 0.0, lambda_map: float = 1.0,
                 lambda_absent: float = 1.0, lambda_curve: float = 0.0, lambda_explainer: float = 0.0,
                 explainer_objective: dict | None = None, init_from: str | None = None,
                 curve_areas: tuple = CURVE_AREAS, curve_temperature: float = CURVE_TEMPERATURE,
                 curve_parts: str = "both", output_grid: int | None = None, baseline: str = "mean",
                 augment: bool = True,
                 rotate: bool = True, lr: float = 1e-3, weight_decay: float = 0.0, optimizer: str = "adam",
                 lr_schedule: str = "cosine", warmup_steps: int = 0, channels_last: bool = True,
                 upsampling: str = "bilinear", log_images: int = 4, explanandum_fingerprint: str | None = None):
        if map_loss not in losses.MAP_LOSSES:
            raise ValueError(f"map_loss: expected one of {losses.MAP_LOSSES}, got {map_loss!r}")
        for name, v in (("lambda_map", lambda_map), ("lambda_absent", lambda_absent), ("lambda_curve", lambda_curve),
                        ("lambda_explainer", lambda_explainer), ("map_top_weight", map_top_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
        losses.check_curve_settings(curve_areas, curve_temperature)
        if output_grid is not None and (isinstance(output_grid, bool) or not isinstance(output_grid, int)
                                        or output_grid < 1):
            raise ValueError(f"output_grid: expected None or an integer >= 1, got {output_grid!r}")
        if curve_parts not in CURVE_PARTS:
            raise ValueError(f"curve_parts: expected one of {CURVE_PARTS}, got {curve_parts!r}")
        if map_top_weight and map_loss != "bce":
            raise ValueError(f"map_top_weight: only the 'bce' map loss weighs pixels, got map_loss {map_loss!r}")
        objective = check_explainer_objective(explainer_objective)
        super().__init__(explanandum, explanandum_fingerprint, baseline=baseline, lr=lr, weight_decay=weight_decay,
                         optimizer=optimizer, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                         channels_last=channels_last)
        self.save_settings()
        self.hparams.explainer_objective = objective
        init = self.explanandum.model if init_encoder_from_explanandum and not self.restoring else None
        self.net = build_mask_net(architecture, encoder, self.num_classes, encoder_weights, decoder_kwargs, init,
                                  channels_last, upsampling)
        if init_from is not None and not self.restoring:
            self._init_from(init_from)
        self._cache: MapCache | None = None
        self._teacher = None
        self.output_grid = output_grid  # what the masks are averaged over at inference (a method may replace it)

    def _init_from(self, path: str) -> None:
        meta, sd = read_meta(Path(path))
        fp = meta.get("explanandum", {}).get("fingerprint")
        if fp is not None and fp != self.explanandum_fingerprint:
            raise ValueError(f"init_from: {path!r} was trained against another explanandum (fingerprint {fp}, "
                             f"this one's {self.explanandum_fingerprint})")
        net = {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
        own = self.net.state_dict()
        bad = sorted(set(own) ^ set(net)) + [k for k in own if k in net and own[k].shape != net[k].shape]
        if bad:
            raise ValueError(f"init_from: {path!r} holds another network than this student's (architecture, encoder, "
                             f"decoder_kwargs and classes must match); differing: {bad[:5]}")
        self.net.load_state_dict(net)

    def class_masks(self, x: torch.Tensor) -> torch.Tensor:
        """Per-class masks (B, C, H, W) in [0, 1], averaged over ``output_grid`` cells when it is set."""
        s = torch.sigmoid(self.mask_logits(x))
        return grid_smooth(s, self.output_grid)

    # ---- the teacher ------------------------------------------------------------------
    def teacher_maps(self, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (classes (K,), maps (K, H, W) in [0, 1]) at the batch's resolution."""
        hp, x = self.hparams, batch["image"]
        size = x.shape[-2:]
        if hp.teacher_cache is not None:
            if self._cache is None:
                roots = [hp.teacher_cache] if isinstance(hp.teacher_cache, str) else list(hp.teacher_cache)
                caches = [MapCache(r, fingerprint=self.explanandum_fingerprint) for r in roots]
                self._cache = caches[0]
                for c in caches[1:]:
                    self._cache.entries.update(c.entries)
            out = []
            for image_id in batch["id"]:
                classes, maps = self._cache.get(str(image_id))
                out.append((classes.to(x.device), upsample(maps[:, None].to(x.device), size)[:, 0]))
            return out
        if hp.teacher is None:
            raise ValueError("teacher: give teacher_cache (an attribute cache) or teacher (a registered method)")
        if self._teacher is None:
            self._teacher = get_method(hp.teacher, self.explanandum, **(hp.teacher_options or {}))
        nz = (batch["labels"] > 0.5).nonzero()
        maps = self._teacher.attribute(x[nz[:, 0]], nz[:, 1]) if len(nz) else x.new_zeros(0, 1, *size)
        maps = minmax_normalize(maps.detach().float())[:, 0]
        return [(nz[nz[:, 0] == b, 1], maps[nz[:, 0] == b]) for b in range(x.shape[0])]

    # ---- the loss -----------------------------------------------------------------------
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        x, y = batch["image"], batch["labels"]
        index = torch.as_tensor(batch.get("index", torch.arange(x.shape[0])), device=x.device)
        teach = self.teacher_maps(batch)
        if hp.augment and self.training:
            x, maps = joint_augment(x, [m for _, m in teach], index, int(self.global_step), hp.rotate)
            teach = [(c, m) for (c, _), m in zip(teach, maps)]
        S = self(x)
        b = torch.cat([torch.full((len(c),), i, device=x.device, dtype=torch.long) for i, (c, _) in enumerate(teach)])
        c = torch.cat([c for c, _ in teach]).long()
        out: dict[str, torch.Tensor] = {}
        total = S.sum() * 0
        if b.numel():
            z = S[b, c]
            t = torch.cat([m for _, m in teach])
            out["map"] = losses.map_distillation_loss(z, t, hp.map_loss, hp.kl_temperature, hp.rank_pairs,
                                                      hp.rank_margin, top_weight=hp.map_top_weight)
            total = total + hp.lambda_map * out["map"]
            if hp.lambda_curve:
                # one explained class per image (pseudo-random in (index, step)): the term costs 2 x areas
                # explanandum passes per row
                present = torch.zeros_like(y, dtype=torch.bool)
                present[b, c] = True
                pick = pick_present(present, index, int(self.global_step))
                rows = present.any(1).nonzero().flatten()
                zc = S[rows, pick[rows]][:, None]
                out["curve"] = self._curve(x[rows], zc, F.one_hot(pick[rows], self.num_classes).float())
                total = total + hp.lambda_curve * out["curve"]
        absent = y < 0.5
        if hp.lambda_absent and absent.any():
            za = S.permute(0, 2, 3, 1)[absent.view(absent.shape[0], 1, 1, -1).expand(-1, *S.shape[-2:], -1)]
            out["absent"] = F.binary_cross_entropy_with_logits(za.float(), torch.zeros_like(za, dtype=torch.float))
            total = total + hp.lambda_absent * out["absent"]
        if hp.lambda_explainer:
            ex = explainer_objective(self, x, y, S, hp.explainer_objective)
            out.update({f"explainer_{k}": v for k, v in ex.items() if k != "loss"})
            out["explainer"] = ex["loss"]
            total = total + hp.lambda_explainer * ex["loss"]
        out["loss"] = total
        return out

    def _curve(self, x: torch.Tensor, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The soft top-a masks must keep the class; the image without them must lose it (one explanandum pass);
        ``curve_parts`` keeps one half."""
        hp = self.hparams
        return losses.curve_term(self.explanandum, x, z, onehot, self.baseline, hp.curve_areas, hp.curve_temperature,
                                 hp.curve_parts).mean()

    def validation_step(self, batch, batch_idx):
        out = self.compute_losses(batch)
        B = batch["image"].shape[0]
        self.log_dict({f"val/{k}": v for k, v in out.items() if k != "loss"}, sync_dist=True, batch_size=B)
        self.log("val/loss", out["loss"], sync_dist=True, batch_size=B, prog_bar=True)
        if batch_idx == 0:
            self.log_validation_panels(batch["image"], None, batch["labels"] > 0.5)
