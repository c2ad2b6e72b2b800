"""Networks: the project's small classifiers (registered with timm) and mask networks."""

from explainer.nets import classifier  # noqa: F401  (registers timm models)
