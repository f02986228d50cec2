"""Sequence parallelism (``parallel.sequence_parallel = S``): the tokens of one clip split over S processes.

The attention itself is diffusers' context parallelism: ``ContextParallelConfig(ulysses_degree=S)`` and
``model.enable_parallelism`` with the model's own context-parallel plan (Wan: the tokens are split at the
first block's input, each attention exchanges heads for tokens with an all-to-all (Ulysses), and the
output projection's result is all-gathered). Nothing here computes attention or moves tokens itself;
this module is the glue the trainer needs on top of it:

* **process layout** — ``W = D × S`` processes: sequence groups are ``S`` consecutive ranks, the data is
  split over the ``D`` groups (:attr:`SequenceParallel.dp_size` / :attr:`~SequenceParallel.dp_rank`), so every
  rank of a group reads the same samples and draws the same per-sample noise, indices and dropout, and the
  adversarial index is drawn for the ``D · batch`` global batch;
* **outputs** — the plan gathers the velocity over the whole clip on every rank, so the consistency, TC
  (whole clip: no halo exchange is needed across the time split) and feature-matching losses (the teacher's
  own head, whose output the plan gathers, decodes each feature shard) are computed on full tensors,
  identically on every rank of the group;
* **discriminator** — its heads normalise each latent frame (GroupNorm over the frame's tokens), so they run
  on whole frames: :meth:`discriminator_frames` gives each rank the frames ``[t·r/S, t·(r+1)/S)`` of every
  captured map (torch's differentiable all-gather of the token shards, whose backward sums the ranks'
  gradient shares, then this rank's frames), and :meth:`mean_over_group` turns the rank's hinge mean into the
  mean over all frames (a sum over the group weighted by the rank's share of the frames; its backward passes
  the gradient through, so each rank back-propagates its own frames' share). The features kept for the D
  step and the heads' activations are thus split ``S`` ways too;
* **gradients** — each rank's parameter gradients (student and discriminator) are this rank's share of the
  gradient, so both losses are scaled by ``S`` before the backward (:attr:`grad_scale`): DDP / FSDP average
  over all ``W`` processes, which then yields the sum over a group averaged over the ``D`` groups;
* **the teacher on the fake sample (G step)** — the gradient a rank gets on ``fake`` through the sequence-split
  teacher is its tokens' share only, added to the consistency loss's whole gradient on the same prediction.
  No exchange is needed: the patch embedding is token-local and the teacher and the student split the same
  token grid the same way, so that share covers exactly the tokens whose gradient this rank's student keeps
  (the backward of the student's output gather keeps this rank's slice). A model whose input embedding mixed
  tokens across the split would need the share summed over the group first.

Supported: Wan (diffusers ships its plan) with ``num_attention_heads`` and the clip's token count divisible by
``S`` and at least ``S`` latent frames. HunyuanVideo has no plan in diffusers 0.42 and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DCMConfigError
from ..schedule import FAMILY_WAN


class _SumOverGroup(torch.autograd.Function):
    """Forward: the sum over the sequence group (the same value on every rank). Backward: the gradient passes
    through unchanged — each rank's summand only reaches that rank's share of the parameter gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@dataclass
class SequenceParallel:
    """The sequence-parallel layout of a run (``degree`` > 1) and the trainer's hooks into it."""

    degree: int
    dp_size: int
    dp_rank: int
    mesh: Any  # DeviceMesh ("dp", "ring", "ulysses")

    @classmethod
    def create(cls, accelerator: Any, degree: int, family: str) -> "SequenceParallel | None":
        """The layout of ``parallel.sequence_parallel = degree`` on this launch (None when 1)."""
        if degree <= 1:
            return None
        n = accelerator.num_processes
        if n % degree:
            raise DCMConfigError(
                f"parallel.sequence_parallel={degree} must divide the number of processes ({n}): launch a multiple "
                f"of {degree} processes (accelerate launch --num_processes) or lower it."
            )
        if family != FAMILY_WAN:
            raise DCMConfigError(
                f"parallel.sequence_parallel={degree}: sequence parallelism uses diffusers' context-parallel plan, "
                f"which diffusers ships for Wan only (not for {family}). Set parallel.sequence_parallel = 1."
            )
        if torch.accelerator.device_count() == 0:
            raise DCMConfigError(
                f"parallel.sequence_parallel={degree} needs GPUs: diffusers' context parallelism derives a device "
                f"index from torch.accelerator.device_count(), which is 0 on this machine. Set "
                f"parallel.sequence_parallel = 1 for CPU runs."
            )
        from torch.distributed.device_mesh import init_device_mesh

        dp = n // degree
        mesh = init_device_mesh(accelerator.device.type, (dp, 1, degree), mesh_dim_names=("dp", "ring", "ulysses"))
        return cls(degree, dp, mesh.get_local_rank("dp"), mesh)

    # ------------------------------------------------------------------ models

    def check_model(self, model: nn.Module, tokens: int, where: str, frames: int | None = None) -> None:
        """Ulysses splits the heads and the tokens ``degree`` ways: both must divide; the discriminator gives each
        process at least one latent frame."""
        heads = int(model.config.num_attention_heads)
        if heads % self.degree:
            raise DCMConfigError(
                f"parallel.sequence_parallel={self.degree} must divide the transformer's num_attention_heads ({heads}) "
                f"(Ulysses attention gives each process heads/{self.degree} heads)."
            )
        if tokens % self.degree:
            raise DCMConfigError(
                f"parallel.sequence_parallel={self.degree} must divide the clip's token count ({tokens}, {where}); "
                f"choose a degree that divides it or clips whose latent frames × (height/2) × (width/2) does."
            )
        if frames is not None and frames < self.degree:
            raise DCMConfigError(
                f"parallel.sequence_parallel={self.degree} is more than the clip's {frames} latent frames ({where}): "
                f"the discriminator gives every process whole frames."
            )

    def enable(self, model: nn.Module, expert_modules: dict[str, str] | None = None) -> None:
        """diffusers' context parallelism on ``model`` (Ulysses, the model's own plan). ``expert_modules``
        (``{base: copy}``, the detail expert's head / embedder copies swapped in by ``expert_mode``) get the
        plan entries of their base module, so the detail expert's output is gathered like the base's."""
        from diffusers import ContextParallelConfig

        plan = dict(type(model)._cp_plan)
        for base, extra in (expert_modules or {}).items():
            if base in plan and hasattr(model, extra):
                plan[extra] = plan[base]
        config = ContextParallelConfig(ulysses_degree=self.degree, mesh=self.mesh["ring", "ulysses"])
        model.enable_parallelism(config=config, cp_plan=plan)

    # ------------------------------------------------------------------ tensors

    @property
    def group(self) -> Any:
        return self.mesh.get_group("ulysses")

    @property
    def grad_scale(self) -> float:
        """Multiplier of the generator loss before the backward (see the module docstring)."""
        return float(self.degree)

    @property
    def rank_in_group(self) -> int:
        return self.mesh.get_local_rank("ulysses")

    def frames(self, t: int) -> tuple[int, int]:
        """``[f0, f1)``: the latent frames (of ``t``) this rank's discriminator heads see."""
        r = self.rank_in_group
        return t * r // self.degree, t * (r + 1) // self.degree

    def discriminator_frames(
        self, shards: list[torch.Tensor], grid: tuple[int, int, int]
    ) -> tuple[list[torch.Tensor], tuple[int, int, int], float]:
        """Token shards ``[B, N/S, D]`` of the captured maps → this rank's whole frames ``[B, (f1−f0)·h·w, D]``,
        their grid and their share of all frames (see the module docstring)."""
        from torch.distributed.nn.functional import all_gather

        t, h, w = grid
        f0, f1 = self.frames(t)
        a, b = f0 * h * w, f1 * h * w
        out = []
        for x in shards:
            parts = all_gather(x, group=self.group)  # differentiable: the backward sums the ranks' shares
            pieces, start = [], 0
            for part in parts:
                n = part.shape[1]
                lo, hi = max(a, start), min(b, start + n)
                if lo < hi:
                    pieces.append(part[:, lo - start : hi - start])
                start += n
            out.append(torch.cat(pieces, dim=1))  # a copy: the gathered map is freed
        return out, (f1 - f0, h, w), (f1 - f0) / t

    def mean_over_group(self, value: torch.Tensor, share: float) -> torch.Tensor:
        """A rank's mean over its share of the frames → the mean over all frames (same value on every rank)."""
        return _SumOverGroup.apply(value * share, self.group)
