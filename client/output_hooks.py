"""Per-sample gradients from hooks on each layer's output tensor (``output_hooks`` mode).

Opacus' ``hooks`` mode (``GradSampleHooks``) registers a *full* backward hook
on every layer with parameters. PyTorch implements a full backward hook by
wrapping the layer's inputs and outputs in extra autograd nodes
(``BackwardHookFunction``) on every forward pass, and Opacus then copies each
per-sample gradient into a freshly zeroed buffer before keeping it. On the
small default classifier these two costs were about a sixth of a DP-SGD step
(``bench/dp_step_cost.py``).

:class:`OutputGradSampleHooks` computes the same per-sample gradients with the
same per-layer rules (Opacus' registry, including
:mod:`client.prelu_grad_sample`; functorch for a layer without a rule, as
Opacus does), but captures ``dL/d(output)`` with a plain tensor hook on the
layer's output, registered by a forward hook, and keeps each rule's result
as it is, with each sample's gradient norm for that parameter (``[B]``,
attribute ``sample_norms`` of ``p.grad_sample``), computed while the result
is still in the CPU's cache; :mod:`client.lean_dp_optimizer` clips with it.
Per-sample gradients of a layer called several times in one forward pass
are summed, as in Opacus. The results are the tensors Opacus
computes (``tests/test_dp_modes.py``).

Against whom: nobody; it is a faster way to compute the same clipped update,
so the privacy guarantee and its accounting are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.grad_sample_module import GradSampleHooks, promote_current_grad_sample
from torch import nn


class OutputGradSampleHooks(GradSampleHooks):
    """Opacus' per-layer grad samplers, fed by tensor hooks on layer outputs.

    Use like Opacus' ``GradSampleHooks`` (batch first, ``loss_reduction``
    ``mean`` or ``sum``): after ``loss.backward()`` every trainable parameter
    ``p`` of shape ``S`` has ``p.grad_sample`` of shape ``[B, *S]``.

    A hook registered on a tensor receives the gradient with respect to the
    value the tensor had when the hook was registered, so an in-place
    operation after a layer (``out.mul_(2)``, an in-place residual add) does
    not change what the layer's rule receives; Opacus' full backward hooks
    refuse such networks (``RuntimeError``: output of
    ``BackwardHookFunction`` modified in place).
    """

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        """Register one forward hook per layer with parameters (Opacus' signature)."""
        if not batch_first:
            raise ValueError("output_hooks needs batch-first inputs")
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        handles: list[Any] = []
        self._module.autograd_grad_sample_hooks = handles
        self.autograd_grad_sample_hooks = handles
        self.force_functorch = force_functorch
        for module in self.iterate_submodules(self._module):
            if force_functorch or type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=True)
            handles.append(module.register_forward_hook(self._on_forward))
        self.enable_hooks()

    def _rule(self, module: nn.Module) -> Any:
        if self.force_functorch or type(module) not in self.GRAD_SAMPLERS:
            return ft_compute_per_sample_gradient
        return self.GRAD_SAMPLERS[type(module)]

    def _on_forward(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """Keep the layer's inputs ``[B, ...]`` and hook the gradient of its output.

        The hook holds the inputs (not the output, which holds the hook) and
        lets them go as soon as the layer's rule has used them.
        """
        if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
            return
        params = [p for p in module.parameters(recurse=True) if p.requires_grad]
        if not params:
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise ValueError(f"output_hooks: {type(module).__name__} returned no tensor that "
                             "needs a gradient; use grad_sample_mode=hooks for this network")
        activations = [t.detach() for t in inputs]
        for p in params:
            p._forward_counter += 1  # type: ignore[attr-defined]

        def on_grad(grad: torch.Tensor) -> None:
            if not self.hooks_enabled:
                return
            held = activations[:]
            activations.clear()  # freed as soon as used, as Opacus pops them
            backprops = grad.detach()
            if self.loss_reduction == "mean":
                backprops = backprops * held[0].shape[0]
            self._keep(module, params, self._rule(module)(module, held, backprops))

        output.register_hook(on_grad)

    def _keep(self, module: nn.Module, params: list[nn.Parameter],
              grad_samples: dict[nn.Parameter, torch.Tensor]) -> None:
        """Store (or add to) each parameter's per-sample gradient, ``[B, *p.shape]``."""
        for param, sample in grad_samples.items():
            if not param.requires_grad:  # functorch's rule returns every parameter
                continue
            current = getattr(param, "_current_grad_sample", None)
            param._current_grad_sample = (  # type: ignore[attr-defined]
                sample if current is None else current + sample)
        for param in params:
            param._forward_counter -= 1  # type: ignore[attr-defined]
            if param._forward_counter == 0:  # type: ignore[attr-defined]
                promote_current_grad_sample(param)
                sample = param.grad_sample  # type: ignore[attr-defined]
                if isinstance(sample, torch.Tensor):  # its norms now, while it is in cache
                    sample.sample_norms = torch.linalg.vector_norm(  # type: ignore[attr-defined]
                        sample.reshape(len(sample), param.numel()), dim=1)
            stacked = getattr(param, "grad_sample", None)
            if (not self.grad_accumulation_allowed and isinstance(stacked, list)
                    and len(stacked) > 1):
                raise ValueError(f"{type(module).__name__}: Poisson sampling is not compatible "
                                 "with gradient accumulation; call optimizer.step() after "
                                 "every backward pass")
