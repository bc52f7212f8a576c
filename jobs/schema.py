"""Structured-config schemas for Hydra: the code's dataclasses are the one home of their defaults.

``conf/method/standard.yaml`` starts from ``schema/method`` (every field of
:class:`robustx.training.loss.MethodConfig` with its default, typed), so the YAML presets carry
only what differs and ``method.KEY=VALUE`` overrides are type-checked when the config is composed.
Entry points and tests call :func:`register_schemas` before Hydra composes a config.
"""

from __future__ import annotations

__all__ = ["register_schemas"]


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent: a second call replaces the same nodes)."""
    from hydra.core.config_store import ConfigStore

    from robustx.training.loss import MethodConfig

    ConfigStore.instance().store(group="schema", name="method", node=MethodConfig)
