"""Adversarial explanations (robustx.explain.adversarial): budget, targets, shapes, errors, precision."""

import pytest
import torch
from torch import nn

from robustx.attacks import engine_attack, rmse
from robustx.explain.adversarial import AEResult, adversarial_explanations, resolve_target_columns, resolve_targets
from robustx.models import PreActResNet, SmallCNN

NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RHO_TOL = 1 + 1e-4


def _tiny_resnet(seed=0, num_classes=10):
    torch.manual_seed(seed)
    return PreActResNet(depth=8, widths=(4, 8, 8), num_classes=num_classes, zero_init_residual=False).eval()


def _synthetic(n, generator, num_classes=4):
    """1x28x28 images: class c is a bright 10x10 square in quadrant c on faint noise."""
    y = torch.randint(num_classes, (n,), generator=generator)
    x = 0.15 * torch.rand(n, 1, 28, 28, generator=generator)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, 2 + 14 * r : 12 + 14 * r, 2 + 14 * q : 12 + 14 * q] += 0.8
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    """A tiny SmallCNN trained for ~2 s to >= 95% on the synthetic 4-class task -> (model, x, y)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, channels=(4, 8, 8), hidden=16, mean=(0.2,), std=(0.3,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(120):
        x, y = _synthetic(64, g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _synthetic(16, g)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.95, f"fixture model did not train ({acc:.2f})"
    return model, x, y


# --------------------------------------------------------------------------- targets


def test_resolve_targets_keywords_indices_names_and_lists():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 1.0, 4.0, 0.0]])
    labels = torch.tensor([2, 0])
    names = ["a", "b", "c", "d"]
    assert resolve_targets(logits, labels, "true").tolist() == [[2], [0]]
    assert resolve_targets(logits, None, "true").tolist() == [[1], [0]]  # predicted class
    # "second": most confident class other than "true"'s.
    assert resolve_targets(logits, labels, "second").tolist() == [[1], [2]]
    assert resolve_targets(logits, None, "second").tolist() == [[2], [2]]
    assert resolve_targets(logits, labels, "all").tolist() == [[0, 1, 2, 3]] * 2
    assert resolve_targets(logits, labels, 3).tolist() == [[3], [3]]
    assert resolve_targets(logits, labels, "c", class_names=names).tolist() == [[2], [2]]
    assert resolve_targets(logits, labels, "C", class_names=names).tolist() == [[2], [2]]  # case-insensitive
    out = resolve_targets(logits, labels, ["true", "d", 0, "second"], class_names=names)
    assert out.dtype == torch.int64
    assert out.tolist() == [[2, 3, 0, 1], [0, 3, 0, 2]]


def test_true_second_all_gives_k_12_for_10_classes():
    logits = torch.randn(5, 10)
    labels = torch.randint(10, (5,))
    t = resolve_targets(logits, labels, ["true", "second", "all"])
    assert t.shape == (5, 12)
    assert torch.equal(t[:, 0], labels)
    assert (t[:, 1] != labels).all()
    masked = logits.scatter(1, labels[:, None], float("-inf"))
    assert torch.equal(t[:, 1], masked.argmax(1))
    assert torch.equal(t[:, 2:], torch.arange(10).expand(5, 10))


def test_all_skips_listed_gives_each_class_once_with_kinds():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 1.0, 4.0, 0.0]])
    # default spec: true, second, then the other classes in ascending order
    t, kinds = resolve_target_columns(logits, None, ["true", "second", "all"], all_skips_listed=True)
    assert t.tolist() == [[1, 2, 0, 3], [0, 2, 1, 3]]
    assert kinds == [["true", "second", "all", "all"]] * 2
    assert torch.equal(resolve_targets(logits, None, ["true", "second", "all"], all_skips_listed=True), t)
    # without the flag: unchanged (K = C + 2, every "all" column of kind "all")
    t, kinds = resolve_target_columns(logits, None, ["true", "second", "all"])
    assert t.tolist() == [[1, 2, 0, 1, 2, 3], [0, 2, 0, 1, 2, 3]] and kinds == [["true", "second"] + ["all"] * 4] * 2
    # "all" first skips the classes named after it; a second "all" adds nothing
    t, kinds = resolve_target_columns(logits, None, ["all", "true", "all"], all_skips_listed=True)
    assert t.tolist() == [[0, 2, 3, 1], [1, 2, 3, 0]] and kinds == [["all", "all", "all", "true"]] * 2
    # a named class equal to "true" for image 0 only: the other items stay, the shorter row is padded (None)
    t, kinds = resolve_target_columns(logits, None, ["true", 1, "all"], all_skips_listed=True)
    assert t.tolist() == [[1, 1, 0, 2, 3], [0, 1, 2, 3, 0]]
    assert kinds == [["true", "class", "all", "all", "all"], ["true", "class", "all", "all", None]]
    # every class listed: "all" adds no column
    t, kinds = resolve_target_columns(logits, None, [0, 1, 2, 3, "all"], all_skips_listed=True)
    assert t.tolist() == [[0, 1, 2, 3]] * 2 and kinds == [["class"] * 4] * 2


def test_all_skips_listed_same_aes_each_class_computed_once(trained, monkeypatch):
    """[true, second, all] with all_skips_listed: K = C, one engine row per (image, class), the plain call's AEs."""
    import robustx.explain.adversarial as ex

    model, x, y = trained
    rows = []
    real = ex.engine_attack
    monkeypatch.setattr(ex, "engine_attack", lambda m, imgs, *a, **k: rows.append(imgs.size(0)) or real(m, imgs, *a, **k))
    spec = ["true", "second", "all"]
    plain = adversarial_explanations(model, x[:3], y[:3], targets=spec, steps=10)
    once = adversarial_explanations(model, x[:3], y[:3], targets=spec, steps=10, all_skips_listed=True)
    assert rows == [3 * 4, 3 * 4]  # the same distinct pairs either way
    assert plain.images.shape[1] == 6 and once.images.shape[1] == 4 and once.targets.shape == (3, 4)
    assert once.kinds == [["true", "second", "all", "all"]] * 3
    assert plain.kinds == [["true", "second", "all", "all", "all", "all"]] * 3
    for i in range(3):
        assert sorted(once.targets[i].tolist()) == [0, 1, 2, 3]  # every class once
        for j, c in enumerate(once.targets[i].tolist()):
            assert torch.equal(once.images[i, j], plain.images[i, 2 + c])  # bit-identical AEs
            assert once.prob_after[i, j] == plain.prob_after[i, 2 + c] and once.rmse[i, j] == plain.rmse[i, 2 + c]
            assert once.prob_before[i, j] == plain.prob_before[i, 2 + c]
    # padded rows (a named class equal to some images' true class) cost no engine row
    rows.clear()
    res = adversarial_explanations(model, x[:3], y[:3], targets=["true", int(y[0]), "all"], steps=3, all_skips_listed=True)
    assert rows == [3 * 4]
    assert [row.count(None) for row in res.kinds] == [0 if int(y[i]) == int(y[0]) else 1 for i in range(3)]
    assert len(set(y[:3].tolist())) > 1  # so some row is padded


@pytest.mark.parametrize(
    "spec, names, bad",
    [
        ("kitten", NAMES, "kitten"),
        (10, None, "10"),
        (-1, None, "-1"),
        (["true", "zebra"], NAMES, "zebra"),
        ("cat", None, "cat"),  # names need class_names
        ([], None, "Empty"),
    ],
)
def test_bad_targets_raise_one_line_value_error(spec, names, bad):
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError) as err:
        resolve_targets(logits, None, spec, class_names=names)
    msg = str(err.value)
    assert "\n" not in msg and bad in msg
    assert "0..9" in msg and "'true'" in msg  # names the valid choices


def test_bad_labels_and_class_names_raise():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="0..9"):
        resolve_targets(logits, torch.tensor([0, 10]), "true")
    with pytest.raises(ValueError, match="one name per class"):
        resolve_targets(logits, None, "true", class_names=["a", "b"])


# --------------------------------------------------------------------------- AEs


def test_shapes_targets_and_rmse_bound_random_model():
    model = _tiny_resnet()
    x = torch.rand(3, 3, 32, 32)
    y = torch.tensor([1, 4, 7])
    res = adversarial_explanations(model, x, y, targets=["true", "second", "all"], rho=0.1, steps=35)
    assert isinstance(res, AEResult)
    assert res.images.shape == (3, 12, 3, 32, 32)
    for name in ("targets", "prob_before", "prob_after", "rmse", "pred_after"):
        assert getattr(res, name).shape == (3, 12), name
    assert res.pred_before.shape == (3,)
    assert res.targets.dtype == torch.int64
    assert torch.equal(res.targets[:, 0], y)
    assert torch.equal(res.targets[:, 2:], torch.arange(10).expand(3, 10))
    assert (res.rmse <= 0.1 * RHO_TOL).all()
    assert (res.rmse > 0.05).all()  # the budget is used
    # The reported numbers describe the returned tensors.
    delta = res.images - x[:, None]
    assert torch.allclose(res.rmse, delta.flatten(2).pow(2).mean(2).sqrt(), atol=1e-6)
    with torch.no_grad():
        p = model(res.images.flatten(0, 1)).softmax(1)  # (B*K, C)
        p0 = model(x).softmax(1)
    assert torch.allclose(res.prob_after.flatten(), p.gather(1, res.targets.reshape(-1, 1))[:, 0], atol=1e-5)
    assert torch.allclose(res.prob_before, p0.gather(1, res.targets), atol=1e-6)
    assert torch.equal(res.pred_before, p0.argmax(1))
    assert torch.equal(res.pred_after.flatten(), p.argmax(1))


def test_final_projection_keeps_rmse_within_rho():
    """The engine's pull-back rule alone can end above rho; the returned AEs never do."""
    model = _tiny_resnet()
    torch.manual_seed(1)
    x = torch.rand(8, 3, 32, 32)
    t = torch.randint(10, (8,))
    raw_over = []
    for steps in (4, 5, 6, 7, 35):
        raw = engine_attack(model, x, t, eps=0.1, steps=steps, criterion="l2", overshoot=5.0, targeted=True)
        raw_over.append(bool((rmse(raw - x) > 0.1 * RHO_TOL).any()))
        res = adversarial_explanations(model, x, t, targets="true", rho=0.1, steps=steps)
        assert (res.rmse <= 0.1 * RHO_TOL).all()
    assert any(raw_over)  # so the projection is needed


def test_trained_model_target_probability_rises_and_rmse_bound(trained):
    model, x, y = trained
    res = adversarial_explanations(model, x[:8], y[:8], targets=["true", "second", "all"], rho=0.1)
    assert res.images.shape == (8, 6, 1, 28, 28)
    assert (res.rmse <= 0.1 * RHO_TOL).all()
    rise = res.prob_after - res.prob_before
    other = res.targets != y[:8, None]
    assert (rise[other] > 0).float().mean() >= 0.9
    assert rise[other].mean() > 0.2
    # Toward the true class the probability does not fall.
    assert (rise[:, 0] > -1e-4).all()
    # A budget of 0.1 RMSE is enough to make a non-robust tiny net predict most targets.
    assert (res.pred_after[other] == res.targets[other]).float().mean() > 0.5


def test_name_targets_and_labels_none(trained):
    model, x, _ = trained
    names = ["top-left", "top-right", "bottom-left", "bottom-right"]
    res = adversarial_explanations(model, x[:4], targets=["true", "bottom-right"], class_names=names, steps=5)
    assert torch.equal(res.targets[:, 0], res.pred_before)
    assert (res.targets[:, 1] == 3).all()


def test_chunked_equals_unchunked(trained):
    model, x, y = trained
    a = adversarial_explanations(model, x[:3], y[:3], targets="all", steps=10)
    b = adversarial_explanations(model, x[:3], y[:3], targets="all", steps=10, chunk_size=5)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert torch.allclose(a.prob_after, b.prob_after, atol=1e-5)


def test_duplicate_pairs_computed_once_and_equal(trained, monkeypatch):
    """"true" is also among "all": the pair is explained once and reported in both columns."""
    import robustx.explain.adversarial as ex

    model, x, y = trained
    rows = []
    real = ex.engine_attack
    monkeypatch.setattr(ex, "engine_attack", lambda m, imgs, *a, **k: rows.append(imgs.size(0)) or real(m, imgs, *a, **k))
    res = adversarial_explanations(model, x[:3], y[:3], targets=["true", "all"], steps=10)
    assert res.targets.shape == (3, 5) and rows == [3 * 4]  # 15 requested pairs, 12 distinct
    for i in range(3):
        t = int(y[i])
        assert torch.equal(res.images[i, 0], res.images[i, 1 + t])
        assert res.prob_after[i, 0] == res.prob_after[i, 1 + t]
    alone = adversarial_explanations(model, x[:3], y[:3], targets="true", steps=10)
    assert torch.allclose(alone.images[:, 0], res.images[:, 0], atol=1e-5)


def test_skipping_unused_gradients_gives_the_same_aes_with_fewer_image_steps(trained):
    """The default (model run only on pairs still inside the budget) equals running every pair every step."""
    model, x, y = trained
    rows = []
    hook = model.register_forward_pre_hook(lambda m, inp: rows.append(inp[0].size(0)))
    try:
        every = adversarial_explanations(model, x[:6], y[:6], targets=["true", "second"], skip_unused_gradients=False)
        n_every, rows[:] = sum(rows), []
        skip = adversarial_explanations(model, x[:6], y[:6], targets=["true", "second"])
        n_skip = sum(rows)
    finally:
        hook.remove()
    assert rmse((skip.images - every.images).flatten(0, 1)).max() < 1e-6
    torch.testing.assert_close(skip.prob_after, every.prob_after, rtol=1e-5, atol=1e-6)
    assert n_skip < 0.8 * n_every  # pulled-back pairs ran no forward


@pytest.mark.slow
def test_compile_matches_eager(trained):
    """compile=True (torch.compile of the engine passes) gives the eager AEs up to fused-kernel rounding."""
    model, x, y = trained
    ref = adversarial_explanations(model, x[:4], y[:4], targets=["true", "second"], steps=10)
    fast = adversarial_explanations(model, x[:4], y[:4], targets=["true", "second"], steps=10, compile=True)
    assert (fast.rmse <= 0.1 * RHO_TOL).all()
    assert rmse((fast.images - ref.images).flatten(0, 1)).max() < 1e-3
    # Clean and final probabilities come from a compiled fp32 forward: eager's up to fp32 rounding.
    torch.testing.assert_close(fast.prob_before, ref.prob_before, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        after = model(fast.images.flatten(0, 1)).softmax(1).gather(1, fast.targets.reshape(-1, 1))[:, 0]  # (B*K,)
    torch.testing.assert_close(fast.prob_after.flatten(), after, rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())


def test_bf16_autocast_close_to_fp32(trained):
    model, x, y = trained
    ref = adversarial_explanations(model, x[:6], y[:6], targets=["true", "second"], rho=0.1)
    fast = adversarial_explanations(model, x[:6], y[:6], targets=["true", "second"], rho=0.1, autocast_dtype=torch.bfloat16)
    assert fast.prob_after.dtype == torch.float32 and fast.images.dtype == torch.float32
    assert (fast.rmse <= 0.1 * RHO_TOL).all()
    diff = rmse((fast.images - ref.images).flatten(0, 1))
    assert diff.max() < 0.25 * 0.1  # AEs differ by much less than the budget
    assert (fast.prob_after - ref.prob_after).abs().max() < 0.1
    assert torch.equal(fast.prob_before, ref.prob_before)  # clean probabilities in full precision


def test_channels_last_same_result_and_model_restored(trained):
    model, x, y = trained
    model.train()
    conv = model.features[0].weight
    ptr = conv.data_ptr()
    conv.grad = torch.ones_like(conv)
    grad = conv.grad
    ref = adversarial_explanations(model, x[:3], y[:3], targets="second", steps=10)
    res = adversarial_explanations(model, x[:3], y[:3], targets="second", steps=10, channels_last=True)
    assert model.training  # mode restored
    model.eval()
    assert conv.is_contiguous() and conv.data_ptr() == ptr  # memory format restored
    assert conv.grad is grad and grad.is_contiguous() and (grad == 1).all()
    conv.grad = None
    assert all(p.requires_grad for p in model.parameters())
    assert res.images.is_contiguous()
    assert torch.allclose(res.images, ref.images, atol=1e-4)


def test_works_inside_no_grad_and_under_callers_autocast():
    model = _tiny_resnet()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        res = adversarial_explanations(model, x, targets="second", steps=3)
    assert res.rmse.max() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res2 = adversarial_explanations(model, x, targets="second", steps=3)
    assert res2.prob_before.dtype == torch.float32
    assert torch.allclose(res2.prob_before, res.prob_before, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, images, match",
    [
        ({"rho": 0.0}, None, "rho must be > 0"),
        ({"rho": -0.1}, None, "rho must be > 0"),
        ({"steps": 0}, None, "steps must be >= 1"),
        ({"chunk_size": 0}, None, "chunk_size"),
        ({}, torch.rand(3, 32, 32), "4-D"),
        ({}, torch.rand(1, 3, 32, 32) * 255, r"\[0, 1\]"),
        ({}, torch.rand(1, 3, 32, 32) - 0.5, r"\[0, 1\]"),
        ({"targets": "kitten", "class_names": NAMES}, None, "kitten"),
        ({"targets": 12}, None, "12"),
    ],
)
def test_bad_inputs_raise_one_line_value_error(kwargs, images, match):
    model = _tiny_resnet()
    x = torch.rand(1, 3, 32, 32) if images is None else images
    with pytest.raises(ValueError, match=match) as err:
        adversarial_explanations(model, x, **kwargs)
    assert "\n" not in str(err.value)


def test_tolerates_tiny_range_overshoot():
    model = _tiny_resnet()
    x = torch.rand(1, 3, 32, 32) * (1 + 5e-4)
    res = adversarial_explanations(model, x, steps=2)
    assert res.images.shape == (1, 1, 3, 32, 32)
