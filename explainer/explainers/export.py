"""Exports: self-describing safetensors bundles and ONNX graphs with a dynamic batch.

A safetensors export holds the explainer's weights and, in the file's
metadata, the JSON of ``export_metadata()``: kind, class names, input size,
normalisation, masking baseline, the explanandum's reference (spec and
weights fingerprint) and every hyper-parameter. ``explainer.load`` reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from explainer.core.io import atomic_path, atomic_save_safetensors
from explainer.explainers.integrity import check_usable
from explainer.explainers.loading import load
from explainer.explanandum import load_explanandum, save_explanandum


class AllClassMasks(nn.Module):
    """x (B, 3, H, W) in [0, 1] -> masks (B, C, H, W): the graph that ONNX export traces."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.class_masks(x)


def export_safetensors(module, out: str | os.PathLike) -> Path:
    check_usable(module, "export")
    meta = module.export_metadata()
    sd = {k: v for k, v in module.state_dict().items() if not k.startswith("explanandum.")}
    return atomic_save_safetensors(sd, out, {"explainer": json.dumps(meta)})


def export_onnx(module, out: str | os.PathLike, input_size: int | None = None, opset: int = 18) -> Path:
    """ONNX graph of all-class masks, dynamic batch, fixed input resolution (``input_size``)."""
    check_usable(module, "export")
    size = int(input_size or getattr(module, "input_size", None) or 128)
    wrapper = AllClassMasks(module.cpu().eval()).eval()
    x = torch.rand(2, 3, size, size)
    meta = module.export_metadata()
    meta["input_size"] = size
    with atomic_path(out) as tmp:
        onnx_tmp = Path(str(tmp) + ".onnx")
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(wrapper, (x,), str(onnx_tmp), input_names=["images"], output_names=["masks"],
                              dynamic_shapes={"x": {0: batch}}, opset_version=opset, dynamo=True,
                              external_data=False)
            import onnx

            model = onnx.load(str(onnx_tmp))
            entry = model.metadata_props.add()
            entry.key, entry.value = "explainer", json.dumps(meta)
            onnx.save(model, str(tmp))
        finally:
            if onnx_tmp.exists():
                onnx_tmp.unlink()
    return Path(out)


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, input_size: int | None = None,
           explanandum: str | None = None) -> Path:
    """Export an explainer checkpoint (safetensors or ONNX), or a classifier checkpoint (safetensors)."""
    if fmt not in ("safetensors", "onnx"):
        raise ValueError(f"format: expected 'safetensors' or 'onnx', got {fmt!r}")
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(ckpt)!r}")
    if ckpt.suffix == ".ckpt":
        try:
            ck = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"checkpoint: cannot read {str(ckpt)!r} (truncated or corrupt?): {err}") from err
        if isinstance(ck, dict) and "explanandum_meta" in ck.get("hyper_parameters", {}):
            if fmt != "safetensors":
                raise ValueError("format: a classifier checkpoint exports to safetensors only")
            return save_explanandum(load_explanandum(ckpt), out)
    module = load(ckpt, explanandum=explanandum)
    if input_size is not None:
        module.input_size = input_size
    if fmt == "safetensors":
        return export_safetensors(module, out)
    return export_onnx(module, out, input_size)
