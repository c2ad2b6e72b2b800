"""The explanandum: the frozen classifier that every method explains.

``load_explanandum(spec)`` resolves a classifier from

* a checkpoint written by this project (``.safetensors`` with its metadata
  inside the file, or a Lightning ``.ckpt`` of :class:`ClassifierModule`),
* ``"timm:<name>"`` or ``"torchvision:<name>"`` (random init unless
  ``weights=`` is given: a local file, or ``"pretrained"`` for the library's
  own weights, which must already be in the local cache when offline),
* a user's factory ``"path/to/file.py:factory"`` or ``"pkg.module:factory"``.

The result maps RGB images in [0, 1] to logits; normalisation happens
inside. It is frozen for good: no trainable parameters, and eval mode that a
parent's ``.train()`` cannot undo (the official Explainer code let batch-norm
statistics drift during explainer training; this cannot).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from explainer import nets as _nets  # noqa: F401  (registers the project's timm models)
from explainer.core.constants import IMAGENET_MEAN, IMAGENET_STD
from explainer.core.images import check_images
from explainer.core.imports import import_object
from explainer.core.io import atomic_save_safetensors

FORMAT = "explainer.explanandum/1"


class Explanandum(nn.Module):
    """A frozen classifier: ``f(x) -> logits (B, C)`` for ``x`` in [0, 1].

    Attributes:
        num_classes, class_names, multilabel: what the classifier predicts.
        mean, std: normalisation applied inside ``forward``.
        spec: how it was loaded (recorded in explainer checkpoints).
        validate: check every input's shape, dtype and range (default True;
            methods that only feed images they built may switch it off).
    """

    def __init__(self, model: nn.Module, num_classes: int, class_names: Sequence[str] | None = None,
                 multilabel: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, spec: str = "", arch: str = "",
                 model_kwargs: dict | None = None, input_size: int | None = None):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"class_names: expected {self.num_classes} names, got {len(names)}")
        self.class_names = names
        self.multilabel = bool(multilabel)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.spec = spec
        self.arch = arch
        self.model_kwargs = dict(model_kwargs or {})
        self.input_size = input_size
        self.validate = True
        self.requires_grad_(False)
        super().train(False)

    # ---- frozen for good ------------------------------------------------
    def train(self, mode: bool = True) -> "Explanandum":
        """Ignored: the explanandum stays in eval mode (BN and dropout frozen)."""
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "Explanandum":
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    @contextlib.contextmanager
    def unchecked(self) -> Iterator["Explanandum"]:
        """Input checks off inside the block (tight loops over images the caller built from checked ones);
        the previous setting restored on exit."""
        old = self.validate
        self.validate = False
        try:
            yield self
        finally:
            self.validate = old

    # ---- forward --------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate:
            check_images(x)
        mean = self.mean.to(dtype=x.dtype)
        std = self.std.to(dtype=x.dtype)
        return self.model((x - mean) / std)

    def try_channels_last(self, probe: torch.Tensor) -> bool:
        """Run the model in channels-last memory format (oneDNN's faster layout for convnets on the CPU), unless its
        code cannot take it (a ``view`` of a feature map, say: checked on ``probe``, one image): then it stays as it
        was, with a warning that names the ``channels_last: false`` setting. A probe that fails in the model's own
        format too is left to the caller's own run (no warning). True when converted."""
        self.model.to(memory_format=torch.channels_last)
        try:
            with torch.no_grad():
                self(probe)
        except RuntimeError as err:
            self.model.to(memory_format=torch.contiguous_format)
            try:
                with torch.no_grad():
                    self(probe)
            except RuntimeError:  # not the layout: the caller's run raises it, with its own message
                return False
            warnings.warn(f"explanandum: the model fails in channels-last format ({str(err).splitlines()[0]}); it "
                          "runs in its own format (set channels_last: false to skip this check)", stacklevel=2)
            return False
        return True

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid of the logits for a multi-label model, softmax otherwise."""
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this classifier."""
        return {"format": FORMAT, "arch": self.arch, "model_kwargs": self.model_kwargs,
                "num_classes": self.num_classes, "class_names": self.class_names,
                "multilabel": self.multilabel, "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist(), "input_size": self.input_size, "spec": self.spec}

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, num_classes={self.num_classes}, multilabel={self.multilabel}"


# ------------------------------------------------------------------ loading --
def build_timm(arch: str, num_classes: int, model_kwargs: dict | None = None, pretrained: bool = False) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"spec: timm has no model {arch!r} (see timm.list_models())") from err
        raise


def build_arch(arch: str, num_classes: int, model_kwargs: dict | None = None) -> nn.Module:
    """A randomly initialised classifier of a recorded architecture: ``"torchvision:<name>"`` or a timm name."""
    if arch.startswith("torchvision:"):
        return _torchvision_model(arch[12:], None, num_classes)[0]
    return build_timm(arch, num_classes, model_kwargs)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    u = urlparse(url)
    host = u.hostname
    if not host:
        return False
    try:
        with socket.create_connection((host, u.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_help(spec: str) -> str:
    return (f"pretrained weights for {spec!r} are not in the local cache and the download host cannot be "
            "reached (no network). Provide them locally: weights='/path/to/weights.safetensors' (or a "
            "weights-only .pth state dict) for this architecture, or copy the hub cache to this machine.")


def _load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"weights: {str(path)!r} is not a readable safetensors file ({err})") from err
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"weights: {str(path)!r} is not a readable weights-only torch file ({err})") from err
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"weights: expected a state dict in {str(path)!r}, got {type(sd).__name__}")
    return sd


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{what}: the weights do not fit the architecture: {str(err)[:600]}") from err


def _timm_pretrained(arch: str, num_classes: int | None) -> nn.Module:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch.split(".")[0] if "." not in arch else arch)
    except Exception:
        cfg = None
    hf_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hf_id:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(hf_id, "model.safetensors") or try_to_load_from_cache(
            hf_id, "pytorch_model.bin")
        if not isinstance(cached, str) and (constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT)):
            raise RuntimeError(_offline_help(f"timm:{arch}"))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(arch, pretrained=True, **kwargs)


def _torchvision_model(name: str, weights: Any, num_classes: int | None):
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as err:
        raise ValueError(f"spec: torchvision has no model {name!r} "
                         f"(see torchvision.models.list_models())") from err
    class_names = None
    if weights in ("pretrained", "DEFAULT", "imagenet"):
        w = torchvision.models.get_model_weights(name).DEFAULT
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(w.url).path).name
        if not cache.is_file() and not _reachable(w.url):
            raise RuntimeError(_offline_help(f"torchvision:{name}"))
        model = builder(weights=w)
        class_names = list(w.meta.get("categories") or []) or None
        if num_classes is not None and num_classes != len(w.meta.get("categories", [])):
            raise ValueError(f"num_classes: the pretrained torchvision:{name} predicts "
                             f"{len(w.meta['categories'])} classes, got num_classes={num_classes}")
        return model, class_names
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return builder(weights=None, **kwargs), None


def _num_outputs(model: nn.Module) -> int:
    """The class count: timm's ``num_classes``, else a probe at the model's own input size."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    model.eval()  # a probe in train mode would move batch-norm statistics
    cfg = getattr(model, "pretrained_cfg", None) or {}
    sizes = [cfg["input_size"][-1]] if "input_size" in cfg else []
    err: Exception | None = None
    for size in [*sizes, 224, 64]:
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, 3, size, size))
        except Exception as e:  # wrong input size for this model: try the next
            err = e
            continue
        if isinstance(out, (tuple, list)):
            out = out[0]
        return int(out.shape[-1])
    raise ValueError(f"spec: the model does not run on a (1, 3, H, W) image: {err}")


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata stored inside a project safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:
        raise ValueError(f"checkpoint: {str(path)!r} is not a readable safetensors file "
                         f"(truncated or corrupt?): {err}") from err
    if "explainer" not in meta:
        raise ValueError(f"checkpoint: {str(path)!r} has no 'explainer' metadata; it was not written by this project")
    return json.loads(meta["explainer"])


def load_explanandum(spec: str | os.PathLike | nn.Module, num_classes: int | None = None,
                     weights: str | os.PathLike | None = None, *, class_names: Sequence[str] | None = None,
                     multilabel: bool | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Explanandum:
    """Resolve ``spec`` to a frozen :class:`Explanandum` (see the module docstring).

    Args:
        spec: checkpoint path, ``"timm:<name>"``, ``"torchvision:<name>"``,
            ``"file.py:factory"`` / ``"pkg.module:factory"``, or an nn.Module.
        num_classes: expected class count; a checkpoint with another count
            is an error, a fresh model gets this many outputs.
        weights: a local weights file (safetensors or weights-only torch), or
            ``"pretrained"`` for timm/torchvision's own weights.
        class_names, multilabel, mean, std: override what the spec implies.
    """
    if isinstance(spec, Explanandum):
        return spec
    arch, model_kwargs, meta = "", {}, {}
    if isinstance(spec, nn.Module):
        model, spec_str = spec, f"module:{type(spec).__name__}"
    else:
        spec_str = str(spec)
        if spec_str.startswith("timm:"):
            arch = spec_str[5:]
            if weights in ("pretrained", "imagenet", "DEFAULT"):
                model = _timm_pretrained(arch, num_classes)
                meta["mean"] = model.pretrained_cfg.get("mean", IMAGENET_MEAN)
                meta["std"] = model.pretrained_cfg.get("std", IMAGENET_STD)
                weights = None
            else:
                model = build_timm(arch, num_classes if num_classes is not None else 1000)
                cfg = getattr(model, "pretrained_cfg", {}) or {}
                meta["mean"], meta["std"] = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        elif spec_str.startswith("torchvision:"):
            arch = f"torchvision:{spec_str[12:]}"  # a saved checkpoint rebuilds it with torchvision
            model, names = _torchvision_model(spec_str[12:], weights, num_classes)
            if names:
                meta["class_names"] = names
            if weights in ("pretrained", "imagenet", "DEFAULT"):
                weights = None
        elif spec_str.endswith((".safetensors", ".ckpt")) or Path(spec_str).is_file():
            return _load_checkpoint(Path(spec_str), num_classes, class_names, multilabel)
        elif ":" in spec_str:
            fn = import_object(spec_str, what="spec")
            params = inspect.signature(fn).parameters
            kwargs = {"num_classes": num_classes} if num_classes is not None and "num_classes" in params else {}
            model = fn(**kwargs)
            if not isinstance(model, nn.Module):
                raise TypeError(f"spec: factory {spec_str!r} returned {type(model).__name__}, expected an nn.Module")
            for k in ("class_names", "multilabel", "mean", "std"):
                if hasattr(model, k):
                    meta[k] = getattr(model, k)
        else:
            raise ValueError(f"spec: cannot resolve {spec_str!r}; expected a checkpoint file that exists, "
                             "'timm:<name>', 'torchvision:<name>', 'path/to/file.py:factory' or 'pkg.module:factory'")
    if weights is not None:
        _load_into(model, _load_state_file(weights), f"weights {str(weights)!r} for {spec_str!r}")
    n = _num_outputs(model)
    if num_classes is not None and n != num_classes:
        raise ValueError(f"num_classes: expected {num_classes} classes, but {spec_str!r} predicts {n}")
    return Explanandum(model, n, class_names=class_names or meta.get("class_names"),
                       multilabel=bool(multilabel if multilabel is not None else meta.get("multilabel", False)),
                       mean=mean or meta.get("mean", IMAGENET_MEAN), std=std or meta.get("std", IMAGENET_STD),
                       spec=spec_str, arch=arch, model_kwargs=model_kwargs)


def _load_checkpoint(path: Path, num_classes, class_names, multilabel) -> Explanandum:
    if not path.is_file():
        raise FileNotFoundError(f"spec: no such checkpoint {str(path)!r}")
    if path.suffix == ".safetensors":
        meta = read_checkpoint_metadata(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint: {str(path)!r} holds {meta.get('format')!r}, expected an explanandum "
                             f"({FORMAT}); an explainer export loads with explainer.load()")
        sd = _load_state_file(path)
    else:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"checkpoint: cannot read {str(path)!r} (truncated or not a weights-only "
                             f"Lightning checkpoint): {err}") from err
        hp = ck.get("hyper_parameters", {}) if isinstance(ck, dict) else {}
        meta = hp.get("explanandum_meta")
        if not meta or meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint: {str(path)!r} is not a classifier checkpoint of this project "
                             "(no 'explanandum_meta' in its hyper-parameters)")
        sd = {k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    if num_classes is not None and num_classes != meta["num_classes"]:
        raise ValueError(f"num_classes: expected {num_classes} classes, but checkpoint {str(path)!r} "
                         f"was trained for {meta['num_classes']}")
    model = build_arch(meta["arch"], meta["num_classes"], meta.get("model_kwargs"))
    _load_into(model, sd, f"checkpoint {str(path)!r}")
    return Explanandum(model, meta["num_classes"], class_names=class_names or meta["class_names"],
                       multilabel=meta["multilabel"] if multilabel is None else multilabel,
                       mean=meta["mean"], std=meta["std"], spec=str(path), arch=meta["arch"],
                       model_kwargs=meta.get("model_kwargs"), input_size=meta.get("input_size"))


def save_explanandum(f: Explanandum, path: str | os.PathLike) -> Path:
    """Write ``f`` as one self-describing safetensors file (atomically): a classifier of timm or torchvision
    (what a checkpoint can rebuild); one built from a module or a factory is refused."""
    if not f.arch:
        raise ValueError(f"explanandum: {f.spec!r} was built from a module or a factory, which a checkpoint cannot "
                         "rebuild; expected a 'timm:<name>' or 'torchvision:<name>' classifier (or keep the factory "
                         "spec and pass its weights file)")

    meta = f.metadata()
    meta["spec"] = ""
    sd = {k: v.detach().contiguous() for k, v in f.model.state_dict().items()}
    return atomic_save_safetensors(sd, path, {"explainer": json.dumps(meta)})
