"""Small helpers shared by the core: dtype, random-draw device, model-state contexts, one-line errors."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["at_least_fp32", "distributed_failure", "draw_device", "frozen_parameters", "model_mode", "one_line"]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is a half type (losses under mixed precision), else unchanged: float64
    stays float64 (``.float()`` would round float64 checks to float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def draw_device(generator: torch.Generator | None, default: torch.device) -> torch.device:
    """Where to draw random numbers: on ``generator``'s device if one is given (a CPU generator
    then drives a CUDA run too, the draws moved after), else on ``default``."""
    return default if generator is None else generator.device


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside the block (restored after).

    Eager autograd skips weight gradients that an input-gradient call does not ask for; a
    compiled backward computes the gradient of every input that requires one, so the
    parameters must not.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def model_mode(model: nn.Module, *, train: bool = False) -> Iterator[None]:
    """The model in train (``train=True``) or eval mode for the block; its own mode is restored after."""
    was_training = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was_training)


def one_line(err: BaseException | str, *, limit: int | None = None) -> str:
    """An exception (or text) on one line, whitespace squeezed (its type name if empty), at most ``limit`` characters."""
    text = " ".join(str(err).split()) or (type(err).__name__ if isinstance(err, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


# What gloo and NCCL say when a peer process died (its sockets closed) or stalled past the timeout.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out",
              "Socket Timeout", "NCCL communicator was aborted", "ProcessGroupNCCL", "DistBackendError")


def distributed_failure(err: BaseException) -> str | None:
    """The one-line cause if ``err`` is a collective failing because another rank died or stalled, else None."""
    import torch.distributed as dist

    text = str(err)
    lost = isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and any(m in text for m in _PEER_LOST)
        and any(b in text.lower() for b in ("gloo", "nccl", "c10d", "distributed")))
    if not lost:
        return None
    first = one_line(text.split("This is typically caused")[0], limit=160)
    return first.split("] ", 1)[-1] if first.startswith("[") else first  # drop the source-file prefix
