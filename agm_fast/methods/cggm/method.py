"""CGGM behind the method interface: per-modality heads, scaled encoder gradients and a direction loss term."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ...fusion import FiLMFusion, SumFusion, output_layer
from ..base import Method, StepOutput
from ..hparams import declare
from .config import HPARAMS, METHOD_HPARAMS
from .core import CGGM

__all__ = ["CGGMMethod"]


@declare(METHOD_HPARAMS)
class CGGMMethod(Method):
    """CGGM (docs/methods.md, section 4) with the reference's training step.

    Every step the heads learn on the detached features and the coefficients B_m follow from their metrics; inside
    the window the encoders' gradients are multiplied by ``rho * B_m``, the global gradient norm of the encoders and
    the fusion head is clipped to ``clip_grad_norm`` (the reference's only guard), and ``lam * l_gm`` is added to
    the next step's loss. The heads are trained by the main optimizer through :meth:`param_groups`, at
    ``head_lr_scale`` times its learning rate and without weight decay (the reference: half the main rate).

    Args:
        encoders, fusion, window, seed, task: as :class:`agm_fast.methods.Method`.
        feature_dims: the M feature sizes (default: ``fusion.dims``; otherwise the heads take them from the first
            forward's features).
        fusion_output: the fusion layer the heads' output layers are compared with (the direction term): a module
            of ``fusion`` or its dotted name in ``fusion.named_modules()`` (default: the last ``nn.Linear``).
        metric, head_loss, heads, process_group: as :class:`agm_fast.CGGM`. Default heads: ``nn.Linear(d_m, C)``
            when the compared layer reads the concatenated features or every one of them; otherwise (an MLP head's
            output layer ``[C, D]``) ``nn.Sequential(nn.Linear(d_m, D), nn.ReLU(), nn.Linear(D, C))``.
        **hparams: CGGM's hyper-parameters (``agm_fast.methods.cggm.config.METHOD_HPARAMS``), including
            ``head_lr_scale`` and the reference's gradient-norm clip ``clip_grad_norm=0.8``.

    Example::

        method = agm_fast.methods.create("cggm", encoders=[enc_a, enc_v], fusion=head, rho=1.3, lam=0.1)
    """

    # A sum head has one output layer per modality, so there is no single fusion output layer to compare with.
    unsupported_fusions = ("sum",)

    accumulation = "hooks"

    def __init__(
        self,
        encoders,
        fusion,
        *,
        window=None,
        seed: int = 0,
        task: str = "classification",
        feature_dims: Optional[Sequence[int]] = None,
        fusion_output=None,
        metric=None,
        head_loss=None,
        heads=None,
        process_group=None,
    ) -> None:
        super().__init__(encoders, fusion, window=window, seed=seed, task=task)
        dims = self.feature_dims(feature_dims, required=False)
        if isinstance(fusion, SumFusion):
            raise ValueError("fusion: expected a head with one output layer, got a SumFusion (one layer per modality)")
        if isinstance(fusion, FiLMFusion) and len(self.encoders) != 2:
            raise ValueError(
                f"fusion: a FiLMFusion's output layer mixes the views, so CGGM compares its heads with it only for "
                f"2 views, got {len(self.encoders)}"
            )
        out_layer = self._fusion_output(fusion, fusion_output)
        if heads is None and dims is None and any(p is not out_layer.weight and p is not out_layer.bias
                                                   for p in fusion.parameters()):
            # The compared layer is not the head's only one (an MLP head): heads that end as it does, [C, D].
            C, D = out_layer.weight.shape
            kw = dict(device=out_layer.weight.device, dtype=out_layer.weight.dtype)
            heads = [nn.Sequential(nn.LazyLinear(D, **kw), nn.ReLU(), nn.Linear(D, C, **kw))
                     for _ in range(self.num_modalities)]
        self.cggm = CGGM(
            list(self.encoders), out_layer, feature_dims=dims, num_classes=out_layer.weight.shape[0], task=task,
            head_optimizer=None, metric=metric, head_loss=head_loss, heads=heads, process_group=process_group,
            **{k: self.hparams_values[k] for k in HPARAMS.names},
        )
        self._warned = False
        self._model_params = [p for m in (*self.encoders, fusion) for p in m.parameters() if p.requires_grad]

    @staticmethod
    def _fusion_output(fusion: nn.Module, fusion_output) -> nn.Module:
        if fusion_output is None:
            return output_layer(fusion)
        if isinstance(fusion_output, str):
            named = dict(fusion.named_modules())
            if fusion_output not in named:
                names = [n for n, mod in named.items() if isinstance(getattr(mod, "weight", None), Tensor)]
                raise ValueError(f"fusion_output: expected the name of a layer of fusion, one of {names}, got "
                                 f"{fusion_output!r}")
            fusion_output = named[fusion_output]
        if not isinstance(fusion_output, nn.Module) or not any(fusion_output is mod for mod in fusion.modules()):
            raise ValueError(f"fusion_output: expected a module of fusion or its name, got "
                             f"{type(fusion_output).__name__}")
        weight = getattr(fusion_output, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"fusion_output: expected a layer with a 2-D weight [C, D], got "
                             f"{type(fusion_output).__name__}")
        C = output_layer(fusion).weight.shape[0]
        if weight.shape[0] != C:
            raise ValueError(f"fusion_output: expected a layer with one row per class ({C}, as the head's output "
                             f"layer), got weight {tuple(weight.shape)}")
        return fusion_output

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """The heads, at ``head_lr_scale * lr`` and without weight decay."""
        return [{"params": list(self.cggm.heads.parameters()), "lr": lr * self.head_lr_scale, "weight_decay": 0.0}]

    def loss_term(self, task_loss: Tensor, out: StepOutput) -> Optional[Tensor]:
        """``lam * l_gm`` of the previous step, inside the window."""
        if not self.in_window(out.epoch):
            return None
        return self.cggm.loss_term(task_loss if self.cggm.direction == "gradient" else None)

    def before_optimizer_step(self, out: Optional[StepOutput] = None, target: Optional[Tensor] = None) -> Tensor:
        """Head metrics and coefficients; inside the window, the encoders' gradients scaled by ``rho * B_m``."""
        out, target = self._resolve(out, target)
        if self.accumulating:
            coeffs = self.finish_accumulated_step()
            if self.in_window(out.epoch) and self.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._model_params, self.clip_grad_norm)
            return coeffs
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        coeffs = self.cggm.observe(out.features, target)
        if not self.in_window(out.epoch):
            return self.ones(target.device)
        self.cggm.scale_gradients_()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._model_params, self.clip_grad_norm)
        return (self.cggm.rho * coeffs).to(torch.float32)

    def modulated_parameters(self) -> List[List[Tensor]]:
        return [list(ps) for ps in self.cggm.params]

    def micro_batch_decision(self, out: StepOutput, target: Tensor) -> Tensor:
        """This micro-batch's heads, metrics and ``rho * B_m`` (ones outside the window), before its backward."""
        if out.features is None:
            raise ValueError("out: expected a StepOutput with the step's features (from forward()), got none")
        coeffs = self.cggm.observe(out.features, target)
        self._micro_active = self.in_window(out.epoch)
        if not self._micro_active:
            return self.ones(target.device)
        return self.cggm.rho * coeffs

    def modulate_micro_gradient(self, m: int, index: int, grad: Tensor, coeffs: Tensor) -> Tensor:
        if not self._micro_active:
            return grad
        return grad * coeffs[m].to(device=grad.device, dtype=grad.dtype)

    def modules(self) -> List[nn.Module]:
        return [self.cggm.heads]

    def to(self, device) -> "CGGMMethod":
        self.cggm.to(device)
        return self

    def end_epoch(self, epoch: int, metrics) -> None:
        """Say once if B_m went negative (a reversed gradient) or past ``bound`` during the epoch (one host read)."""
        flags = getattr(self.cggm, "flags", None)
        if flags is None or self._warned:
            return
        negative, clamped = (bool(v) for v in flags.tolist())
        self.cggm.flags = None
        if negative or clamped:
            self._warned = True
            what = "went negative (reversing an encoder's gradient)" if negative else f"exceeded {self.cggm.bound}"
            warnings.warn(
                f"cggm: a coefficient B_m {what} in epoch {epoch}; the reference's formula is unbounded "
                "(docs/methods.md, section 4.2); bound= and min_coeff= limit it",
                stacklevel=2,
            )

    def method_state(self) -> Dict[str, Any]:
        return self.cggm.state_dict()

    def load_method_state(self, state) -> None:
        self.cggm.load_state_dict(state)
