"""Explanations: adversarial explanations, attribution baselines (captum), the invalidation study, faithfulness metrics and figures."""
