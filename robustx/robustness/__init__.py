"""Measuring robustness: minimal adversarial perturbations, the Accuracy-Robustness Area, its torchmetrics metric and the adv-lib cross-check."""
