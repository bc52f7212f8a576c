"""Invalidation metrics on hand-built cases, the invalidation study, differentiable Grad-CAM and the manipulation attack."""

import math

import pytest
import torch
import torch.nn.functional as F

from robustx.explain.attribution import attribution_maps, find_gradcam_layer
from robustx.explain.invalidation import invalidation_study, summarize_invalidation
from robustx.explain.manipulation import differentiable_gradcam, manipulation_attack
from robustx.explain.maps import energy_in_top, spearman, top_mask, top_overlap, top_weights
from robustx.stats import summarize_values
from robustx.models import PreActResNet, SmallCNN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _resnet():
    torch.manual_seed(0)
    return PreActResNet(depth=8, widths=(4, 8, 8), zero_init_residual=False).eval()


def _smooth(b, c, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(b, c, 6, 6, generator=g), size=size, mode="bilinear", align_corners=False).clamp(0, 1)


# --- metrics on hand-built maps --------------------------------------------------------------


def test_identical_maps_give_correlation_one_and_full_overlap():
    m = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(spearman(m, m), torch.ones(3, dtype=torch.float64))
    assert torch.equal(top_overlap(m, m, 0.2), torch.ones(3, dtype=torch.float64))
    # a monotone transform keeps the ranking
    assert torch.allclose(spearman(m, m.pow(3) + 5), torch.ones(3, dtype=torch.float64))


def test_reversed_ranking_gives_minus_one():
    m = torch.arange(64.0).view(1, 8, 8)
    assert torch.allclose(spearman(m, -m), -torch.ones(1, dtype=torch.float64))
    assert torch.allclose(spearman(m, 63 - m), -torch.ones(1, dtype=torch.float64))


def test_disjoint_top_regions_give_zero_overlap():
    a = torch.zeros(1, 10, 10)
    b = torch.zeros(1, 10, 10)
    a[0, :2] = 1.0  # top 20%: rows 0-1
    b[0, -2:] = 1.0  # top 20%: rows 8-9
    assert top_overlap(a, b, 0.2).item() == 0.0
    half = b.clone()
    half[0, 0, :] = 2.0  # 10 of b's 20 top pixels now in row 0, which is in a's top
    half[0, -1, :] = 0.0
    assert top_overlap(a, half, 0.2).item() == pytest.approx(0.5)


def test_top_mask_size_and_constant_map_spearman_is_nan():
    m = torch.rand(2, 5, 7)
    mask = top_mask(m, 0.2)
    assert mask.shape == m.shape and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [7, 7]  # round(0.2 * 35)
    for i in range(2):
        assert m[i][mask[i]].min() >= m[i][~mask[i]].max()
    rho = spearman(torch.ones(1, 4, 4), torch.rand(1, 4, 4))
    assert math.isnan(rho.item())


def test_energy_in_top_on_a_hand_made_delta():
    m = torch.zeros(1, 10, 10)
    m[0, :2] = 1.0  # top 20% = rows 0-1
    delta = torch.zeros(1, 3, 10, 10)
    delta[0, 0, 0, 0] = 3.0  # energy 9 inside
    delta[0, 1, 5, 5] = 1.0  # energy 1 outside
    delta[0, 2, 9, 9] = math.sqrt(2.0)  # energy 2 outside
    assert energy_in_top(delta, m, 0.2).item() == pytest.approx(9 / 12)
    assert math.isnan(energy_in_top(torch.zeros(1, 3, 10, 10), m, 0.2).item())
    even = torch.ones(1, 3, 10, 10)
    assert energy_in_top(even, m, 0.2).item() == pytest.approx(0.2)


def test_metric_errors_are_one_line():
    with pytest.raises(ValueError, match="frac must be in"):
        top_overlap(torch.rand(1, 4, 4), torch.rand(1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="same"):
        spearman(torch.rand(1, 4, 4), torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="delta"):
        energy_in_top(torch.rand(1, 4, 4), torch.rand(1, 4, 4))


def test_summarize_values_skips_nan_and_brackets_the_mean():
    s = summarize_values([1.0, 2.0, 3.0, float("nan"), 4.0], bootstrap=200)
    assert s["n"] == 4 and s["n_undefined"] == 1
    assert s["mean"] == pytest.approx(2.5)
    assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert summarize_values([], bootstrap=10)["n"] == 0


# --- the study --------------------------------------------------------------------------------


def test_invalidation_study_records_really_change_the_prediction():
    model = _resnet()
    x = _smooth(6, 3, 16, seed=3)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image "correct"
    y[0] = (y[0] + 1) % 10  # one misclassified image: left out
    out = invalidation_study(model, x, y, methods=["gradcam", "saliency", "ae"], attack_steps=40, attack_eps=2.0,
                             map_options={"ae_steps": 3}, bootstrap=50, keep_tensors=True, ids=list(range(10, 16)),
                             noise_control=True)
    assert out["num_images"] == 6 and out["num_correct"] == 5
    recs = out["records"]
    assert [r["id"] for r in recs] == [11, 12, 13, 14, 15]
    assert sum(r["changed"] for r in recs) >= 3
    t = out["tensors"]
    adv = t["adversarial"]
    assert adv.min() >= 0 and adv.max() <= 1  # clipped search: valid images get explained
    with torch.no_grad():
        pred = model(adv).argmax(1)
    for j, r in enumerate(recs):
        assert r["pred_adv"] == int(pred[j])
        if r["changed"]:
            assert r["pred_adv"] != r["label"]
            assert r["r"] == pytest.approx(float((adv[j] - t["clean"][j]).pow(2).mean().sqrt()), rel=1e-3)
        for m in ("gradcam", "saliency", "ae"):
            met = r["metrics"][m]
            assert set(met) == {"spearman", "top_overlap", "energy_in_top", "spearman_orig_class", "top_overlap_orig_class",
                                "spearman_noise", "top_overlap_noise"}
            for v in met.values():
                assert v is None or -1 - 1e-9 <= v <= 1 + 1e-9
    assert t["maps_clean"]["gradcam"].shape == (5, 16, 16)
    s = out["summary"]
    assert s["n_changed"] == sum(r["changed"] for r in recs)
    assert 0.0 <= s["noise_keeps_prediction"] <= 1.0
    assert s["methods"]["saliency"]["spearman"]["n"] + s["methods"]["saliency"]["spearman"]["n_undefined"] == s["n_changed"]
    again = summarize_invalidation(recs, ["saliency"], bootstrap=50)
    assert again["methods"]["saliency"]["top_overlap"]["mean"] == pytest.approx(s["methods"]["saliency"]["top_overlap"]["mean"])


def test_invalidation_study_reports_search_progress_in_image_steps():
    model = _resnet()
    x = _smooth(5, 3, 16, seed=6)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[1] = (y[1] + 1) % 10  # misclassified: not searched
    steps, seen, labels = 12, [], []
    out = invalidation_study(model, x, y, methods=["saliency"], attack_steps=steps, attack_eps=2.0, bootstrap=0,
                             progress=labels.append, search_progress=seen.append)
    assert out["num_correct"] == 4
    assert seen == [4] * steps  # one call per search step, with the images searched in it
    assert labels == ["minimal perturbation", "maps saliency"]


def test_invalidation_study_rejects_unknown_methods():
    with pytest.raises(ValueError, match="Unknown attribution method"):
        invalidation_study(_resnet(), torch.rand(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), methods=["gradcam", "nope"])


# --- differentiable Grad-CAM and the manipulation attack -------------------------------------


@pytest.mark.parametrize("arch", ["resnet", "small_cnn"])
def test_differentiable_gradcam_matches_captum(arch):
    if arch == "resnet":
        model, x = _resnet(), _smooth(3, 3, 32, seed=4)
    else:
        torch.manual_seed(0)
        model, x = SmallCNN(channels=(4, 8, 8), hidden=16).eval(), _smooth(3, 1, 28, seed=4)
    targets = torch.tensor([0, 3, 7])
    ref = attribution_maps(model, x, targets, method="gradcam")  # captum LayerGradCam, upsampled
    xg = x.clone().requires_grad_(True)
    cam = differentiable_gradcam(model, None, xg, targets)
    assert cam.shape == ref.shape
    assert torch.allclose(cam.detach(), ref, atol=1e-5, rtol=1e-4)
    (g,) = torch.autograd.grad(cam.sum(), xg)
    assert g.abs().sum() > 0  # the map can be optimized through
    layer = find_gradcam_layer(model)
    assert torch.allclose(differentiable_gradcam(model, layer, x, targets).detach(), ref, atol=1e-5, rtol=1e-4)


def test_manipulation_attack_respects_budgets_and_reports_rates():
    model = _resnet()
    x = _smooth(4, 3, 16, seed=5)
    with torch.no_grad():
        y = model(x).argmax(1)
    budgets = [0.002, 0.05]
    out = manipulation_attack(model, x, y, budgets=budgets, steps=8, bootstrap=20, keep_tensors=True)
    assert out["num_correct"] == 4
    rows = out["budgets"]
    assert [(r["budget"], r["variant"]) for r in rows] == [(b, v) for b in budgets for v in ("map_preserving", "plain")]
    for r in rows:
        assert 0.0 <= r["success_rate"] <= 1.0
        assert r["n"] == 4
        assert r["max_rmse"] <= r["budget"] * (1 + 1e-4)
        for p in r["per_image"]:
            assert p["rmse"] <= r["budget"] * (1 + 1e-4)
            assert p["success"] == (p["pred"] != int(y[p["id"]]))  # ids default to 0..B-1
    for a in out["tensors"]["attacks"]:
        adv = a["adversarial"]
        assert adv.min() >= 0 and adv.max() <= 1
        rm = (adv - x).flatten(1).pow(2).mean(1).sqrt()
        assert (rm <= a["budget"] * (1 + 1e-4)).all()
    large = [r for r in rows if r["budget"] == 0.05]
    assert max(r["success_rate"] for r in large) > 0  # an RMSE of 0.05 flips an untrained net


def test_manipulation_attack_errors():
    with pytest.raises(ValueError, match="budgets"):
        manipulation_attack(_resnet(), torch.rand(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), budgets=[0.0])
    with pytest.raises(ValueError, match="steps >= 1"):
        manipulation_attack(_resnet(), torch.rand(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), steps=0)


def test_ties_at_the_threshold_do_not_inflate_overlap():
    # Two sparse maps (5 positive pixels each, disjoint) on 100 pixels: the top 20 are 5 positives
    # plus 15 of 95 tied zeros. Position-based tie-breaking would pick the same zeros in both maps.
    a = torch.zeros(1, 10, 10)
    b = torch.zeros(1, 10, 10)
    a.view(-1)[:5] = 1.0
    b.view(-1)[-5:] = 1.0
    expected = 2 * 5 * (15 / 95) / 20 + 90 * (15 / 95) ** 2 / 20  # positives of one in the other's tied share, plus shared zeros
    assert top_overlap(a, b, 0.2).item() == pytest.approx(expected)
    assert top_overlap(a, b, 0.2).item() < 0.3
    w = top_weights(a, 0.2)
    assert w.sum().item() == pytest.approx(20.0)
    # a constant map is at chance level against anything
    assert top_overlap(torch.zeros(1, 10, 10), torch.rand(1, 10, 10), 0.2).item() == pytest.approx(0.2)
    # energy inside a sparse map's region counts the tied zeros with their share
    delta = torch.zeros(1, 1, 10, 10)
    delta.view(-1)[50] = 1.0  # on a tied zero of a
    assert energy_in_top(delta, a, 0.2).item() == pytest.approx(15 / 95)
