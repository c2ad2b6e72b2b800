"""Terms LTX and distillation share: the curve term, the step hash; finetuning passes its settings as values."""

import copy

import pytest
import torch
import torch.nn.functional as F

import explainer
from explainer import losses
from explainer.core.masking import apply_mask
from explainer.explainers import LTXModule
from explainer.explainers.explainer import step_hash
from explainer.explainers.ltx import finetune
from explainer.explainers.ltx_settings import LTXObjective

SMP_TINY = dict(network="smp", encoder="tu-explainer_resnet_tiny",
                decoder_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})


def plain_curve(f, x, z, onehot, baseline, areas, temperature):
    """Per image and area, one explanandum call on each masked image; the soft top-a mask written out."""
    keep = torch.zeros(len(areas), x.shape[0])
    lose = torch.zeros(len(areas), x.shape[0])
    for i in range(x.shape[0]):
        zi = z[i].flatten()
        c = int(onehot[i].argmax())
        for j, a in enumerate(areas):
            q = torch.quantile(zi, 1 - a)
            ma = torch.sigmoid((z[i:i + 1] - q) / (zi.std() * temperature))
            kept = f(apply_mask(x[i:i + 1], ma, baseline, f.mean))[0]
            gone = f(apply_mask(x[i:i + 1], 1 - ma, baseline, f.mean))[0]
            if f.multilabel:
                p = torch.sigmoid(kept)
                keep[j, i] = sum(-torch.log(p[k]) if k == c else -torch.log(1 - p[k]) for k in range(p.shape[0]))
                lose[j, i] = -torch.log(1 - torch.sigmoid(gone[c]))
            else:
                keep[j, i] = -torch.log_softmax(kept, 0)[c]
                lose[j, i] = -torch.log(1 - torch.softmax(gone, 0)[c])
    return keep, lose


@pytest.mark.parametrize("multilabel", [True, False])
def test_curve_term_equals_plain_computation(multilabel):
    torch.manual_seed(0)
    f = explainer.load_explanandum("timm:explainer_resnet_tiny", num_classes=4, multilabel=multilabel)
    x, z = torch.rand(3, 3, 32, 32), torch.randn(3, 1, 32, 32) * 2
    onehot = F.one_hot(torch.tensor([1, 3, 0]), 4).float()
    areas, temperature = (0.1, 0.3), 0.2
    with torch.no_grad():
        keep, lose = plain_curve(f, x, z, onehot, "mean", areas, temperature)
        got = {p: losses.curve_term(f, x, z, onehot, "mean", areas, temperature, p) for p in losses.CURVE_PARTS}
    assert torch.allclose(got["both"].keep, keep, atol=1e-5) and torch.allclose(got["both"].lose, lose, atol=1e-5)
    assert torch.allclose(got["both"].per_row(), (keep + lose).mean(0), atol=1e-5)
    assert torch.isclose(got["both"].mean(), keep.mean() + lose.mean(), atol=1e-5)
    assert got["keep"].lose is None and torch.allclose(got["keep"].per_row(), keep.mean(0), atol=1e-5)
    assert got["lose"].keep is None and torch.isclose(got["lose"].mean(), lose.mean(), atol=1e-5)
    # extra masks ride in the same pass and do not change the curve halves
    m = torch.sigmoid(z)
    with torch.no_grad():
        extra = losses.curve_term(f, x, z, onehot, "mean", areas, temperature, also_keep=[m], also_lose=[m])
        want_kept = losses.counterfactual_loss(f(apply_mask(x, m, "mean", f.mean)), onehot, "groundtruth",
                                               multilabel, "none")
    assert torch.allclose(extra.keep, keep, atol=1e-5) and torch.allclose(extra.kept[0], want_kept, atol=1e-5)
    with pytest.raises(ValueError, match="curve_parts"):
        losses.curve_term(f, x, z, onehot, "mean", areas, temperature, "half")
    with pytest.raises(ValueError, match="curve_areas"):
        losses.check_curve_settings([0.1, 1.0], 0.1)


def test_step_hash_equals_plain_integer_arithmetic():
    index, classes = torch.tensor([0, 1, 7, 4095, 123]), torch.arange(3)
    got = step_hash(index.view(-1, 1), 17, classes.view(1, -1))
    for i, idx in enumerate(index.tolist()):
        for c in classes.tolist():
            v = (idx * 1000003 + c * 7919 + 17 * 104729) * 2654435761
            v = (v + 2 ** 63) % 2 ** 64 - 2 ** 63  # int64 wraps around (index 4095 does)
            assert int(got[i, c]) == v % 4294967291
    assert torch.equal(step_hash(index, 5), step_hash(index, 5, 0))


def test_finetuning_leaves_hparams_unchanged_throughout(tiny_cnn):
    torch.manual_seed(0)
    m = LTXModule(tiny_cnn, **SMP_TINY, lambda_mask=5.0, baseline="black")
    before = copy.deepcopy(dict(m.hparams))
    seen = []
    objective = m.objective

    def watched(*args, **kwargs):  # the hyperparameters as each finetuning step sees them
        seen.append(copy.deepcopy(dict(m.hparams)))
        return objective(*args, **kwargs)

    m.objective = watched
    finetune(m, torch.rand(2, 3, 32, 32), [1, 2], steps=2,
             objective={"lambda_mask": 1.0, "baseline": "mean", "lambda_curve": 2.0, "curve_areas": [0.2]})
    assert len(seen) == 2 and all(s == before for s in seen)
    assert dict(m.hparams) == before
    # the finetuning objective is a value: the module's own settings with the changes
    s = m.objective_settings(lambda_mask=1.0, curve_areas=[0.2])
    assert s == LTXObjective(**{**{k: before[k] for k in s.__dataclass_fields__}, "lambda_mask": 1.0,
                                "curve_areas": (0.2,)})
    with pytest.raises(ValueError, match="kl_scope"):
        m.objective_settings(kl_scope="some")


def test_unchecked_restores_the_check(tiny_cnn):
    with pytest.raises(RuntimeError), tiny_cnn.unchecked() as f:
        assert f.validate is False
        f(torch.full((1, 3, 32, 32), 5.0))  # out of range: not checked here
        raise RuntimeError("leave the block")
    assert tiny_cnn.validate is True
    with pytest.raises(ValueError):
        tiny_cnn(torch.full((1, 3, 32, 32), 5.0))
