import math

import pytest

from robustx.training.adaptive import AdaptivePsi, integrator_step


def test_controller_sequence_matches_hand_computation():
    psi = AdaptivePsi(psi0=220.0, k=0.02, l_target=1.5, eps_better=1.0, eps_worse=0.01)
    losses = [2.3, 1.6, 1.5, 0.6, 0.2, 3.0, 1.4, 10.0, 0.001]
    # By hand: I <- max(0, I + clip(-ln(L/1.5), -0.01, 1)).
    expected_i = []
    i = 0.0
    for loss in losses:
        e = -math.log(loss / 1.5)
        i = max(0.0, i + min(1.0, max(-0.01, e)))
        expected_i.append(i)
    got = [psi.update(loss) for loss in losses]
    assert expected_i[:3] == [0.0, 0.0, 0.0]  # worse than target at I = 0 stays clamped at 0
    assert expected_i[3] == pytest.approx(-math.log(0.6 / 1.5))
    assert expected_i[4] == pytest.approx(expected_i[3] + 1.0)  # clipped at eps_better
    assert expected_i[5] == pytest.approx(expected_i[4] - 0.01)  # clipped at eps_worse
    for g, ei in zip(got, expected_i):
        assert g == pytest.approx(220.0 * math.exp(0.02 * ei))
    assert psi.integral == pytest.approx(expected_i[-1])


def test_state_round_trip_and_fixed_mode():
    a = AdaptivePsi()
    for loss in (0.3, 0.4, 0.2):
        a.update(loss)
    b = AdaptivePsi()
    b.load_state_dict(a.state_dict())
    assert b.psi == a.psi and b.integral == a.integral > 0
    fixed = AdaptivePsi(psi0=5.0, adaptive=False)
    assert [fixed.update(x) for x in (0.1, 0.1)] == [5.0, 5.0]


def test_errors():
    with pytest.raises(ValueError, match="l_target must be > 0"):
        AdaptivePsi(l_target=0)
    with pytest.raises(ValueError, match="finite and > 0"):
        integrator_step(0.0, float("nan"))
    assert integrator_step(1.0, 0.0) == 2.0


def test_unreachable_ce_target_warns(caplog):
    """l_target >= ln(C) (a uniform guess's CE) makes psi grow without bound: the module says so."""
    import logging

    from lightning_modules.robust_classifier import RobustClassifier

    model = {"_target_": "robustx.models.SmallCNN", "num_classes": 10}
    with caplog.at_level(logging.WARNING, logger="lightning_modules.robust_classifier"):
        RobustClassifier(model=model, method={"name": "robust", "penalty": True, "l_target": 1.5})
    assert not [r for r in caplog.records if "l_target" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="lightning_modules.robust_classifier"):
        RobustClassifier(model=model, method={"name": "robust", "penalty": True, "l_target": 3.0})
    (rec,) = [r for r in caplog.records if "l_target" in r.getMessage()]
    assert "ln(10)=2.30" in rec.getMessage()
