"""The one interface behind every attribution method, and the plumbing they share.

* :class:`Method` -- constructor ``Method(f, **options)``, ``attribute(x, target) -> (B, 1, H, W)``.
* the registry -- :func:`register`, :func:`available`, :func:`get` (names -> classes, one place).
* targets -- :func:`resolve_targets` (from :mod:`explainer.core.targets`) turns ``int | list[int] | LongTensor (B,)
  | None`` into ``LongTensor (B,)``.
* layers -- :func:`find_layer`, :func:`default_layers`: modules chosen by dotted name inside ``f.model``.
* hooks -- :func:`forward_hooks`, :func:`capture_outputs`: context managers that always remove their
  hooks, also when the body raises (the Zennit pattern).
* small helpers -- :func:`trapezoid_weights`, :func:`minmax_normalize`, :func:`upsample`, :func:`chunks`,
  :func:`progress_bar`, :func:`no_validation`.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, ClassVar, Iterable, Iterator, TypeVar

import torch
from torch import nn

from explainer.core.images import check_images
from explainer.core.models import is_vit
from explainer.core.registry import Registry
from explainer.core.targets import TargetLike, resolve_targets
from explainer.explanandum import Explanandum, load_explanandum

T = TypeVar("T")

# --------------------------------------------------------------------------------------------- registry --
METHODS: Registry[Callable[..., "Method"]] = Registry("method")
_REGISTRY = METHODS._items  # the registry's own dict (tests remove throw-away entries through it)


def _name_method(name: str, obj: Any) -> None:
    if isinstance(obj, type) and issubclass(obj, Method) and not obj.__dict__.get("name"):
        obj.name = name


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`Method` (or a factory ``(f, **options) -> Method``) known as ``name``.

    Registering a different object under a taken name is an error; re-registering the same class (a
    module reloaded) replaces it.
    """
    return METHODS.register(name, hook=_name_method)


def available() -> list[str]:
    """Names of all registered methods, sorted."""
    return METHODS.available()


def get(name: str, f: nn.Module | str | None, **options: Any) -> "Method":
    """Build the method called ``name`` for explanandum ``f`` with its ``options``.

    ``f`` may be an :class:`~explainer.explanandum.Explanandum`, a bare ``nn.Module`` (wrapped with
    :func:`explainer.load_explanandum`) or anything ``load_explanandum`` resolves (``"timm:<name>"``, a
    checkpoint path). An option the method does not take is an error that names the method.
    """
    factory = METHODS.get(name)
    try:
        return factory(f, **options)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise TypeError(f"method {name!r}: {err}; its options are those of "
                        f"{getattr(factory, '__qualname__', factory)}") from err


# ------------------------------------------------------------------------------------------------ layers --
def find_layer(model: nn.Module, name: str, what: str = "layer") -> nn.Module:
    """The module at dotted path ``name`` inside ``model`` (``"layer4"``, ``"features.28"``, ``"blocks.11"``).

    Negative indices in a path are allowed (``"blocks.-1.norm1"``). An unknown name raises a ValueError
    listing the closest and the top-level candidates.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: expected a dotted module name, got {name!r}")
    modules = dict(model.named_modules())
    resolved = _normalise_path(model, name)
    if resolved in modules and resolved != "":
        return modules[resolved]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    top = [n for n, _ in model.named_children()]
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise ValueError(f"{what}: no module {name!r} in {type(model).__name__}; {hint}top-level modules: "
                     f"{', '.join(top)} (any dotted path from model.named_modules() works)")


def _normalise_path(model: nn.Module, name: str) -> str:
    """Resolve negative indices in a dotted path: ``blocks.-1`` -> ``blocks.11`` (unknown paths unchanged)."""
    mod, out = model, []
    for p in name.split("."):
        if p.startswith("-") and p[1:].isdigit() and isinstance(mod, (nn.Sequential, nn.ModuleList)):
            p = str(len(mod) + int(p))
        mod = mod._modules.get(p) if mod is not None else None
        out.append(p)
    return ".".join(out)


def default_layers(model: nn.Module) -> tuple[str, str]:
    """``(last, previous)`` layer names for common architectures.

    ResNet-like (``layer4``): ``("layer4", "layer3")``; timm stage models (``stages``, or ``blocks`` of a
    CNN such as EfficientNet): the last two stages;
    ``features`` CNNs (VGG, DenseNet, torchvision ConvNeXt/EfficientNet): the last convolution and the last
    convolution before the final down-sampling; timm ViT: ``blocks.<N-1>.norm1`` and ``blocks.<N-2>.norm1``
    (the input of the last blocks: the class token alone feeds the head, so the last block's patch tokens
    carry no gradient).
    """
    names = dict(model.named_children())
    if "layer4" in names and "layer3" in names:
        return "layer4", "layer3"
    stages = names.get("stages")
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages) >= 2:
        return f"stages.{len(stages) - 1}", f"stages.{len(stages) - 2}"
    if is_vit(model):
        n = len(model.blocks)
        return f"blocks.{n - 1}.norm1", f"blocks.{max(n - 2, 0)}.norm1"
    blocks = names.get("blocks")  # timm EfficientNet / MobileNet: a Sequential of stages
    if isinstance(blocks, nn.Sequential) and len(blocks) >= 2:
        return f"blocks.{len(blocks) - 1}", f"blocks.{len(blocks) - 2}"
    feats = names.get("features")
    if isinstance(feats, nn.Module):
        mods = list(feats.named_modules())[1:]  # in forward order for Sequential features
        convs = [i for i, (_, m) in enumerate(mods) if isinstance(m, nn.Conv2d)]
        if convs:
            last = convs[-1]
            # the block before ends at the last conv before the last down-sampling that precedes `last`
            downs = [i for i, (_, m) in enumerate(mods[:last]) if _downsamples(m)]
            prev = max((c for c in convs if downs and c < downs[-1]), default=last)
            return f"features.{mods[last][0]}", f"features.{mods[prev][0]}"
    raise ValueError(f"layer: no default layer for {type(model).__name__}; pass layer= a module name, e.g. "
                     f"one of {', '.join(n for n, _ in model.named_children())}")


def _downsamples(m: nn.Module) -> bool:
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        return True
    stride = getattr(m, "stride", 1) if isinstance(m, nn.Conv2d) else 1
    return max(stride if isinstance(stride, (tuple, list)) else (stride,)) > 1


def tokens_to_map(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A layer output as a spatial map (B, C, h, w): 4-D outputs pass; ViT tokens (B, N, D) drop the
    prefix (class) tokens and fold the patch tokens onto the patch grid."""
    if t.dim() == 4:
        return t
    if t.dim() == 3 and is_vit(model):
        n_prefix = int(getattr(model, "num_prefix_tokens", 1))
        patches = t[:, n_prefix:]
        gh, gw = grid_size(model, patches.shape[1])
        return patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)
    raise ValueError(f"layer: expected a layer with a spatial output (B, C, h, w) or ViT tokens, got an output "
                     f"of shape {tuple(t.shape)}")


def grid_size(model: nn.Module, n: int) -> tuple[int, int]:
    g = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if g is not None and g[0] * g[1] == n:
        return int(g[0]), int(g[1])
    s = int(round(n ** 0.5))
    if s * s != n:
        raise ValueError(f"cannot fold {n} patch tokens onto a square grid")
    return s, s


# ------------------------------------------------------------------------------------------------- hooks --
@contextlib.contextmanager
def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register forward hooks ``(module, hook)`` for the body of a ``with``; remove them on any exit."""
    handles = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each module's latest output in the yielded dict (name -> tensor)."""
    store: dict[str, torch.Tensor] = {}

    def make(key):
        def hook(_m, _i, out):
            store[key] = out
            # downstream in-place ops (ReLU(inplace=True) after a conv) must not overwrite what we keep
            return out.clone() if isinstance(out, torch.Tensor) else out
        return hook

    with forward_hooks((m, make(k)) for k, m in modules.items()):
        yield store


def run_expanded(f: nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    """``f(x)`` while forward hooks expand a layer's output into path points; a shape error then most likely
    means the layer's output does not alone feed the rest of the network, which is said."""
    try:
        return f(x)
    except RuntimeError as err:
        if "size" not in str(err) and "shape" not in str(err):
            raise
        raise RuntimeError(f"{where}: expanding the layer's output into path points failed ({err}); these methods "
                           "need layers whose output alone feeds the rest of the network (ResNet stages, VGG "
                           "features, ViT blocks), not a module inside a residual branch") from err


@contextlib.contextmanager
def no_validation(f: Explanandum) -> Iterator[Explanandum]:
    """Switch off the explanandum's per-call input checks inside tight loops (the method built the inputs):
    :meth:`Explanandum.unchecked`."""
    with f.unchecked():
        yield f


# ----------------------------------------------------------------------------------------------- helpers --
def check_steps(value: Any, name: str = "steps", minimum: int = 1) -> int:
    """An int >= ``minimum`` or a ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_areas(areas: Any, name: str = "areas") -> tuple[float, ...]:
    """Areas as a tuple of floats strictly inside (0, 1)."""
    vals = (areas,) if isinstance(areas, (int, float)) else tuple(areas)
    if not vals:
        raise ValueError(f"{name}: expected at least one area in (0, 1), got {areas!r}")
    for a in vals:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < float(a) < 1.0:
            raise ValueError(f"{name}: every area must be a fraction of the image strictly inside (0, 1), "
                             f"got {areas!r}")
    return tuple(float(a) for a in vals)


def trapezoid_weights(steps: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``alpha_k = k / steps`` (k = 0..steps) and trapezoid weights summing to 1.

    ``int_0^1 g(a) da ~= sum_k w_k g(alpha_k)`` with ``w = [1/2, 1, ..., 1, 1/2] / steps``. (Captum's
    ``method="riemann_trapezoid"`` uses the same points with ``n_steps = steps + 1`` but weights
    ``1 / n_steps``, which sum to ``steps / (steps + 1)``.)
    """
    alphas = torch.linspace(0, 1, steps + 1, device=device, dtype=dtype)
    w = torch.full((steps + 1,), 1.0 / steps, device=device, dtype=dtype)
    w[0] = w[-1] = 0.5 / steps
    return alphas, w


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size``."""
    size = max(1, int(size))
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def progress_bar(iterable: Iterable[T], enabled: bool, desc: str = "", total: int | None = None) -> Iterable[T]:
    """A tqdm bar around ``iterable`` when ``enabled``, the iterable itself otherwise."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def target_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``logits[b, target[b]]`` for every row ``b`` (B,)."""
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


# ------------------------------------------------------------------------------------------------ Method --
class Method:
    """Base class of every attribution method: ``Method(f, **options).attribute(x, target) -> (B, 1, H, W)``.

    Subclasses implement :meth:`_attribute` (x already checked and on the explanandum's device, targets
    resolved to LongTensor (B,)). Common options:

    Args:
        f: the explanandum (an :class:`~explainer.explanandum.Explanandum`, a bare nn.Module, or a spec
            string that :func:`explainer.load_explanandum` resolves).
        internal_batch_size: bound on the number of images in one forward pass of methods that make many
            passes (path points, masks, perturbations); memory scales with it, results do not.
        progress: show a tqdm bar over long per-image optimisations and loops (default off).
        seed: seed of every random choice a method makes (RISE masks, INR initialisation, area sampling);
            the same seed gives identical results.
    """

    name: ClassVar[str] = ""

    def __init__(self, f: nn.Module | str, *, internal_batch_size: int = 64, progress: bool = False,
                 seed: int = 0):
        self.f = self._explanandum(f)
        self.internal_batch_size = check_steps(internal_batch_size, "internal_batch_size")
        self.progress = bool(progress)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        self.seed = seed

    @staticmethod
    def _explanandum(f: Any) -> Explanandum:
        if isinstance(f, Explanandum):
            return f
        if f is None:
            raise ValueError("f: expected the explanandum (an Explanandum, an nn.Module or a spec string), got None")
        return load_explanandum(f)

    @property
    def model(self) -> nn.Module:
        """The raw network inside the explanandum (layer names are paths inside it)."""
        return self.f.model

    def layer(self, name: str | None, which: str = "last", what: str = "layer") -> tuple[str, nn.Module]:
        """``(name, module)`` of a layer chosen by name, or the architecture's default ``which`` layer."""
        if name is None:
            last, prev = default_layers(self.model)
            name = last if which == "last" else prev
        return name, find_layer(self.model, name, what)

    def attribute(self, x: torch.Tensor, target: TargetLike = None) -> torch.Tensor:
        """Attribution maps for images ``x`` (B, 3, H, W) in [0, 1]: float (B, 1, H, W) on ``x``'s device."""
        check_images(x)
        dev = device_of(self.f)
        xd = x.detach().to(dev)
        t = resolve_targets(self.f, xd, target)
        with torch.enable_grad():
            out = self._attribute(xd, t)
        if out.dim() != 4 or out.shape[0] != x.shape[0] or out.shape[1] != 1 or out.shape[-2:] != x.shape[-2:]:
            raise RuntimeError(f"{type(self).__name__} returned maps of shape {tuple(out.shape)}, "
                               f"expected {(x.shape[0], 1, *x.shape[-2:])}")
        return out.detach().float().to(x.device)

    __call__ = attribute

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, f={self.f.spec or type(self.f.model).__name__!r})"
