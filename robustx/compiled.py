"""``torch.compile`` for the attack engine's forward and input-gradient passes (not in the paper).

The engine (robustx.attacks.engine_attack) calls ``model(x)`` and differentiates w.r.t. x only;
compiled, BatchNorm, the activation and their derivatives fuse into a few kernels around the
convolutions. On the project's 2-core CPU this makes resnet44's forward + input gradient
about 1.3-1.6x faster in fp32 and 1.9-2.7x faster with bf16 autocast + channels_last than the
eager fp32 loop (bench/bench_explain.py, bench/bench_ara.py, BENCHMARKS.md). Double backprop (the training
penalty) cannot run through compiled graphs; training does not use this.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["compiled_forward", "frozen_parameters"]

log = logging.getLogger(__name__)

_COMPILED: Callable[[nn.Module, Tensor], Tensor] | None = None
_UNAVAILABLE = False  # set after a failed compilation: later calls run eagerly


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


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "this machine cannot compile" (no C++ compiler, no Triton, ...)."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed

        errors.append(BackendCompilerFailed)
    except ImportError:  # pragma: no cover - torch without dynamo
        pass
    try:
        from torch._inductor.exc import CppCompileError, InductorError

        errors += [CppCompileError, InductorError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def compiled_forward(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x -> model(x)`` through one process-wide ``torch.compile``d function.

    The model is an argument, not captured, so no compiled object keeps it alive; torch.compile
    guards on the module, its mode and the input shapes and recompiles only when they change
    (weights updated in place, as during training, reuse the compiled code). The first call per
    model and shape compiles: tens of seconds on a CPU. Where compiling is impossible (no C++
    compiler for the CPU backend, no Triton on a GPU), a warning is logged once and the model
    runs eagerly: the results are the same, only slower.

    Args:
        model: any nn.Module mapping (B, C, H, W) images to (B, num_classes) logits.
    """
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_forward)
    fn = _COMPILED

    def call(x: Tensor) -> Tensor:
        global _UNAVAILABLE
        if _UNAVAILABLE:
            return model(x)
        try:
            return fn(model, x)
        except _compile_errors() as err:
            _UNAVAILABLE = True
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("torch.compile is unavailable here (%s); running eagerly. Set compile=false to skip it.", first[:300])
            return model(x)

    return call
