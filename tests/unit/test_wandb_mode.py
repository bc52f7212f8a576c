import logging

from jobs import train as run


def test_offline_without_key(monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with caplog.at_level(logging.INFO):
        assert run.configure_wandb_mode() == "offline"
    assert "no API key" in caplog.text
    import os

    assert os.environ["WANDB_MODE"] == "offline"


def test_offline_when_unreachable(monkeypatch, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(run, "_wandb_reachable", lambda timeout=3.0: False)
    with caplog.at_level(logging.INFO):
        assert run.configure_wandb_mode() == "offline"
    assert "not reachable" in caplog.text


def test_online_with_key_and_network(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(run, "_wandb_reachable", lambda timeout=3.0: True)
    assert run.configure_wandb_mode() == "online"
