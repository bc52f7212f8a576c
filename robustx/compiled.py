"""``torch.compile`` for the attack engine's forward and input-gradient passes (not in the paper).

The engine (robustx.attacks.engine_attack) calls ``model(x)`` and differentiates w.r.t. x only;
compiled, BatchNorm, the activation and their derivatives fuse into a few kernels around the
convolutions. Three ways: :func:`compiled_forward` compiles the forward and lets autograd run the
compiled backward (used by the ARA search, batches of ~100); :func:`compiled_input_grad` traces
forward and input gradient as one graph with inductor's C++ wrapper on a CPU; and
:func:`compiled_engine_step` adds the engine's update rule to that graph and checks dynamo's
guards once per engine run (used by adversarial explanations, batches of ~10, where per-step
overheads matter). On the
project's 2-core CPU, bf16 autocast + channels_last + either makes resnet44's forward + input
gradient about 2-2.5x faster than the eager fp32 loop (bench/bench_explain.py,
bench/bench_ara.py, BENCHMARKS.md). Training uses :func:`compiled_forward` for its attack when
``method.adversarial.compile`` is set; the penalty's double backprop cannot run through compiled
graphs (robustx.training.double_backprop compiles its second-order kernels instead).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustx.attacks import ce_input_grad, engine_update
from robustx.utils import at_least_fp32, one_line

__all__ = ["compiled_forward", "retain_graph_allowed", "compiled_input_grad", "compiled_engine_step", "FastForward"]

log = logging.getLogger(__name__)

_UNAVAILABLE = False  # set after a failed compilation: later calls run eagerly
# compiled_input_grad's functions, one per device type (the C++ wrapper is a CPU option).
_COMPILED_GRAD: dict[str, Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]] = {}
_GRAD_UNAVAILABLE = False  # set after a failed compilation or trace: later calls use compiled_forward
_COMPILED_STEP: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {}
_STEP_UNAVAILABLE = False  # set after a failed compilation or trace: later calls use compiled_input_grad


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


def retain_graph_allowed():
    """Context in which compiled graphs are built without donated buffers and may be backpropagated more than once.

    torch reads the setting when it compiles and again at each compiled backward, so the attacks
    that call ``autograd.grad(..., retain_graph=True)`` on a :class:`FastForward` run inside it.
    """
    import torch._functorch.config as functorch_config  # a submodule torch does not import by itself

    return functorch_config.patch(donated_buffer=False)


def _forward_retainable(model: nn.Module, x: Tensor) -> Tensor:
    # its own code object, hence its own dynamo cache: graphs compiled for compiled_forward's
    # default (donated buffers) are never reused where a caller needs retain_graph=True
    return model(x)


_COMPILED_BY_KIND: dict[bool, Callable[[nn.Module, Tensor], Tensor]] = {}


def compiled_forward(model: nn.Module, *, retain_graph: bool = False) -> Callable[[Tensor], Tensor]:
    """``x -> model(x)`` through one process-wide ``torch.compile``d function.

    The model is an argument, not captured, so no compiled object keeps it alive; torch.compile
    guards on the module, its mode and the input shapes and recompiles only when they change
    (weights updated in place, as during training, reuse the compiled code). The first call per
    model and shape compiles: tens of seconds on a CPU. Where compiling is impossible (no C++
    compiler for the CPU backend, no Triton on a GPU), a warning is logged once and the model
    runs eagerly: the results are the same, only slower.

    Args:
        model: any nn.Module mapping (B, C, H, W) images to (B, num_classes) logits.
        retain_graph: compile without donated buffers, so that the backward may run more than
            once on one graph (``autograd.grad(..., retain_graph=True)``, as FAB's per-class
            Jacobian does); the default's compiled backward refuses that. The backwards must
            also run inside :func:`retain_graph_allowed` (torch checks the setting again there).
    """
    retain_graph = bool(retain_graph)
    if retain_graph not in _COMPILED_BY_KIND:
        _COMPILED_BY_KIND[retain_graph] = torch.compile(_forward_retainable if retain_graph else _forward)
    fn = _COMPILED_BY_KIND[retain_graph]

    def call(x: Tensor) -> Tensor:
        global _UNAVAILABLE
        if _UNAVAILABLE:
            return model(x)
        try:
            if retain_graph:
                with retain_graph_allowed():  # read when aot_autograd compiles, i.e. inside this call
                    return fn(model, x)
            return fn(model, x)
        except _compile_errors() as err:
            _UNAVAILABLE = True
            log.warning("torch.compile is unavailable here (%s); running eagerly. Set compile=false to skip it.", one_line(err, limit=300))
            return model(x)

    return call


def _loss_and_logits(x: Tensor, model: nn.Module, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(x)
    return F.cross_entropy(at_least_fp32(logits), labels, reduction="sum"), logits


_input_grad = torch.func.grad(_loss_and_logits, argnums=0, has_aux=True)


def _grad_and_logits(model: nn.Module, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    grad, logits = _input_grad(x, model, labels)
    return logits, grad


def compiled_input_grad(model: nn.Module) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(x, labels) -> (logits, d sum CE(model(x), labels) / dx)`` as one compiled graph (not in the paper).

    The attack engine's step needs the logits and the input gradient of the summed
    cross-entropy. :func:`compiled_forward` compiles the forward and lets autograd run the
    compiled backward: two graphs and autograd's bookkeeping per step. Here ``torch.func.grad``
    of the loss is traced, so forward and input gradient are one forward-only graph, and on a
    CPU inductor's C++ wrapper replaces the Python code that launches each kernel. At the
    small batches of explanations (10 image-target pairs, resnet44) this cuts the per-step
    time by about 15-20% against :func:`compiled_forward` (bench/explore_fused_input_grad.py,
    BENCHMARKS.md). Call it with the model's parameters frozen (:func:`robustx.utils.frozen_parameters`).
    Where tracing or compiling fails, a warning is logged once and the step runs through
    :func:`compiled_forward` (itself eager where nothing compiles): same results, slower.

    Args:
        model: any nn.Module mapping (B, C, H, W) images to (B, num_classes) logits.
    Returns:
        A function of x (B, C, H, W) and labels (B,) returning logits (B, num_classes) and the
        gradient (B, C, H, W), both detached.
    """
    fallback = compiled_forward(model)

    def call(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        global _GRAD_UNAVAILABLE
        if not _GRAD_UNAVAILABLE:
            kind = x.device.type
            fn = _COMPILED_GRAD.get(kind)
            if fn is None:
                fn = _COMPILED_GRAD[kind] = torch.compile(_grad_and_logits, options={"cpp_wrapper": kind == "cpu"})
            try:
                with torch.no_grad():
                    return fn(model, x, labels)
            except (*_compile_errors(), *_trace_errors()) as err:
                _GRAD_UNAVAILABLE = True
                log.warning("compiling the input gradient as one graph failed (%s); compiling the forward only.", one_line(err, limit=300))
        return ce_input_grad(fallback, x, labels)

    return call


def _trace_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "dynamo cannot trace this model under torch.func.grad"."""
    try:
        from torch._dynamo.exc import Unsupported

        return (Unsupported,)
    except ImportError:  # pragma: no cover
        return ()


def _engine_step(model, images, delta, mom, labels, ss, keep, **rule):
    grad, logits = _input_grad(images + delta, model, labels)
    return (logits, *engine_update(images, delta, mom, logits, grad, labels, ss, keep, **rule))


def compiled_engine_step(model: nn.Module) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """One attack-engine step (forward, input gradient and the update rule) as one compiled graph (not in the paper).

    For :func:`robustx.attacks.engine_attack`'s ``step_fn``: like :func:`compiled_input_grad`,
    plus the engine's rule (:func:`robustx.attacks.engine_update`) inside the graph, so a step
    launches no eager operations; step size and eps enter as tensors (no recompilation per
    step). The batch dimension is marked dynamic, so the changing subsets of
    ``engine_attack(skip_unused_gradients=True)`` share one graph (batch size 1 is specialized
    by dynamo and gets its own). After a step has run with dynamo's guards checked, later calls
    with the same shapes, strides, dtypes, settings, train/eval mode and autocast state skip the
    guard evaluation (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: about 0.5 ms
    a step for resnet44, 3% of an explanation step at batch 10); anything else re-checks them.
    A callable criterion, or a model that cannot be traced or compiled, runs
    :func:`compiled_input_grad` and the eager rule instead (one warning line for a failure).
    Call it with the model's parameters frozen (:func:`robustx.utils.frozen_parameters`), and make one per
    engine run: the parameters' shapes, strides and dtypes must not change between the calls of
    one returned function (its guard skipping does not look at them).

    Returns:
        ``f(images, delta, mom, labels, ss, keep, *, criterion, eps, momentum, targeted, clip)
        -> (logits (B, num_classes), new delta (B, C, H, W), new mom (B, C, H, W))``.
    """
    grad_fn = compiled_input_grad(model)
    checked = set()  # the keys of calls that ran with guards checked

    def call(images, delta, mom, labels, ss, keep, **rule):
        global _STEP_UNAVAILABLE
        if not _STEP_UNAVAILABLE and isinstance(rule["criterion"], str):
            kind = images.device.type
            fn = _COMPILED_STEP.get(kind)
            if fn is None:
                fn = _COMPILED_STEP[kind] = torch.compile(_engine_step, options={"cpp_wrapper": kind == "cpu"})
            tensors = (images, delta, mom, labels) + ((keep,) if keep is not None else ())
            for t in tensors:  # one graph for every batch size (but 1, which dynamo specializes)
                torch._dynamo.maybe_mark_dynamic(t, 0)
            key = (
                tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors),
                tuple((k, v) for k, v in rule.items() if k != "eps"),  # eps enters as a tensor
                model.training, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind),
            )
            as_tensor = lambda v: torch.tensor(v, dtype=images.dtype, device=images.device)  # noqa: E731
            args = (model, images, delta, mom, labels, as_tensor(ss), keep)
            kwargs = {**rule, "eps": as_tensor(rule["eps"])}
            try:
                with torch.no_grad():
                    if key in checked:
                        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                            return fn(*args, **kwargs)
                    out = fn(*args, **kwargs)
                    checked.add(key)
                    return out
            except (*_compile_errors(), *_trace_errors()) as err:
                _STEP_UNAVAILABLE = True
                log.warning("compiling the engine step as one graph failed (%s); compiling the input gradient only.", one_line(err, limit=300))
        logits, grad = grad_fn(images + delta, labels)
        with torch.no_grad():
            return (logits, *engine_update(images, delta, mom, logits, grad, labels, ss, keep, **rule))

    return call


class FastForward(nn.Module):
    """``model`` under bf16 autocast, channels_last and :func:`compiled_forward`, returning fp32 logits (not in the paper).

    For attacks written against a plain ``model(x)`` (AutoAttack's, adv-lib's): they call this
    module instead and differentiate through it as usual. The caller re-checks what they find
    on ``model`` itself in fp32, since a bf16 attack can stop a hair short of the fp32 boundary
    (robustx.robustness.fixed_radius / crosscheck do). Attacks that backpropagate one graph more
    than once (FAB) run inside :func:`retain_graph_allowed`. The batch dimension is marked dynamic so
    the shrinking subsets attacks work on share one compiled graph. On the project's 2-core CPU
    the three together make resnet44's forward + input gradient about 3.3x faster than eager
    fp32 at batch 64 (docs/evaluation.md, "Speed"). Share ``model``'s parameters (no copy).

    Args:
        model: classifier on (B, C, H, W) images in [0, 1] returning (B, num_classes) logits.
        bf16: run under ``torch.autocast(dtype=torch.bfloat16)``.
        channels_last: hand the model channels_last inputs (convert the model itself too).
        compile: through :func:`compiled_forward` (falls back to eager with one warning).
    """

    def __init__(self, model: nn.Module, *, bf16: bool = True, channels_last: bool = True, compile: bool = True) -> None:
        super().__init__()
        self.model = model
        # (not ``self.compile``: that would hide nn.Module.compile)
        self.bf16, self.channels_last, self.compiled = bool(bf16), bool(channels_last), bool(compile)
        # attacks such as FAB run several backwards on one graph
        self._fn = compiled_forward(model, retain_graph=True) if compile else model
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled and x.size(0) > 1:
            torch._dynamo.maybe_mark_dynamic(x, 0)  # one graph for the attacks' changing batch sizes
        if self.compiled and torch.is_grad_enabled() and not x.requires_grad and not any(
                p.requires_grad for p in self.model.parameters()):
            # nothing to differentiate: the no-grad graph serves it (one compilation fewer)
            with torch.no_grad():
                return self._call(x)
        return self._call(x)

    def _call(self, x: Tensor) -> Tensor:
        if self.bf16:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = self._fn(x)
        else:
            out = self._fn(x)
        return out.float()
