"""Attribution baselines (robustx.explain.attribution): shapes, non-negativity, layer choice, LIME."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustx.explain.attribution import METHODS, attribution_maps, find_gradcam_layer, slic_feature_mask
from robustx.explain.adversarial import adversarial_explanations
from robustx.models import PreActResNet, SmallCNN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAST = dict(ae_steps=5, ig_steps=8, smoothgrad_samples=4, lime_samples=40, lime_segments=10)


def _resnet():
    torch.manual_seed(0)
    return PreActResNet(depth=8, widths=(4, 8, 8), zero_init_residual=False)


def _small_cnn():
    torch.manual_seed(0)
    return SmallCNN(channels=(4, 8, 8), hidden=16)


def _smooth(b, c, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(b, c, 6, 6, generator=g), size=size, mode="bilinear", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("arch", ["resnet", "small_cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_nonnegative_maps_at_input_size(arch, method):
    model, x = (_resnet(), _smooth(2, 3, 32)) if arch == "resnet" else (_small_cnn(), _smooth(2, 1, 28))
    model.train()  # the call must use eval mode and restore train mode
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    maps = attribution_maps(model, x, torch.tensor([1, 2]), method=method, **FAST)
    assert maps.shape == (2, x.size(2), x.size(3))
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert maps.sum() > 0
    assert model.training
    assert torch.equal(bn.running_mean, stats)  # no train-mode forward happened


def test_find_gradcam_layer_picks_last_spatial_feature_map():
    resnet = _resnet()
    layer = find_gradcam_layer(resnet)
    assert layer is resnet.pipe[-3]  # final BN + activation, before global pooling
    cnn = _small_cnn()
    assert find_gradcam_layer(cnn) is cnn.features[8]  # last activation, not the 4x4 pooling
    out = {}
    h = layer.register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    resnet.eval()(torch.rand(1, 3, 32, 32))
    h.remove()
    assert out["o"].dim() == 4 and out["o"].shape[2:] == (8, 8)


def test_find_gradcam_layer_skips_reused_modules_and_containers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.relu = nn.ReLU()  # called twice
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

        def forward(self, x):
            return self.head(self.relu(self.block(self.relu(self.conv1(x)))))

    net = Net()
    assert find_gradcam_layer(net, torch.rand(1, 3, 16, 16)) is net.block[1]


def test_gradcam_layer_by_name_and_unknown_name():
    model, x = _resnet(), _smooth(2, 3, 32)
    t = torch.tensor([0, 3])
    a = attribution_maps(model, x, t, method="gradcam")
    b = attribution_maps(model, x, t, method="gradcam", layer="pipe.5")
    c = attribution_maps(model, x, t, method="gradcam", layer=model.pipe[5])
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="pipe.7") as err:
        attribution_maps(model, x, t, method="gradcam", layer="pipe.99")
    assert "\n" not in str(err.value)


def test_unknown_method_and_bad_targets():
    model, x = _small_cnn(), _smooth(1, 1, 28)
    with pytest.raises(ValueError, match="integrated_gradients") as err:
        attribution_maps(model, x, torch.tensor([0]), method="deeplift")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        attribution_maps(model, x, torch.tensor([0, 1]), method="saliency")


def test_ae_map_is_per_pixel_rmse_of_the_explanation():
    model, x = _small_cnn(), _smooth(2, 1, 28)
    t = torch.tensor([3, 5])
    maps = attribution_maps(model, x, t, method="ae", rho=0.1, ae_steps=6)
    res = adversarial_explanations(model, x, t, rho=0.1, steps=6)
    expect = (res.images[:, 0] - x).pow(2).mean(1).sqrt()
    assert torch.allclose(maps, expect, atol=1e-6)
    # Mean of squared map = squared total RMSE.
    assert torch.allclose(maps.pow(2).flatten(1).mean(1).sqrt(), res.rmse[:, 0], atol=1e-5)


def test_lime_is_deterministic_for_a_seed():
    model, x = _resnet(), _smooth(1, 3, 32)
    t = torch.tensor([4])
    kw = dict(method="lime", lime_samples=40, lime_segments=10)
    state = torch.get_rng_state()
    a = attribution_maps(model, x, t, generator_seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    b = attribution_maps(model, x, t, generator_seed=7, **kw)
    assert torch.equal(a, b)
    s1 = attribution_maps(model, x, t, method="smoothgrad", smoothgrad_samples=4, generator_seed=1)
    s2 = attribution_maps(model, x, t, method="smoothgrad", smoothgrad_samples=4, generator_seed=1)
    s3 = attribution_maps(model, x, t, method="smoothgrad", smoothgrad_samples=4, generator_seed=2)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


def test_lime_recovers_superpixel_contributions_of_a_linear_model():
    """For a linear model and black baselines, the target logit is exactly linear in the superpixel switches."""
    torch.manual_seed(0)

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(0.05 * torch.randn(5, 3 * 32 * 32))

        def forward(self, x):
            return x.flatten(1) @ self.w.t()

    model, x = Linear(), _smooth(1, 3, 32, seed=3)
    maps = attribution_maps(model, x, torch.tensor([2]), method="lime", lime_samples=120, lime_segments=20)
    mask = slic_feature_mask(x[0], 20).flatten()
    s = int(mask.max()) + 1
    contrib = (model.w[2].detach().view(3, 32, 32) * x[0]).sum(0).flatten()
    exact = torch.zeros(s).index_add_(0, mask, contrib).clamp(min=0)
    got = torch.zeros(s).index_add_(0, mask, maps.flatten()) / torch.bincount(mask, minlength=s)
    assert (got - exact).abs().max() < 0.05 * contrib.abs().sum() / s + 0.02 * exact.max()


def test_slic_mask_is_contiguous_for_rgb_gray_and_noise():
    for img in (_smooth(1, 3, 32)[0], _smooth(1, 1, 28)[0], torch.rand(3, 32, 32), torch.rand(1, 28, 28)):
        mask = slic_feature_mask(img, 20)
        assert mask.shape == (1, 1, *img.shape[1:]) and mask.dtype == torch.int64
        ids = mask.unique()
        assert torch.equal(ids, torch.arange(len(ids)))
        assert len(ids) >= 5  # noise does not collapse to one segment


def test_lime_surrogate_lives_on_the_images_device():
    # captum builds the surrogate's linear layer on the CPU and moves only LIME's samples to a
    # `device`; ours follows the images (a CUDA run failed with a device mismatch before).
    from robustx.explain.attribution import _lime_model

    m = _lime_model(4, torch.device("meta"))
    m._construct_model_params(in_features=4, out_features=1)
    assert m.linear.weight.device.type == "meta"
