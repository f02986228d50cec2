"""Memory of the training step, counted deterministically (no timing, no RSS): autograd saved tensors.

The detail stage's G step runs the frozen teacher WITH gradient on the fake sample. With
``model.gradient_checkpointing`` the teacher is checkpointed per block like the student (review C1):
every tensor a teacher block saves for backward disappears from the graph (recomputed in the
backward), while the discriminator's hooks still fire and the step's numbers stay the same.
"""

from __future__ import annotations

import contextlib

import torch

from dcm_core.train.trainer import DCMTrainer

TINY4 = "{dim = 128, num_layers = 4, ffn_dim = 256}"


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (parameters excluded), split by where they were saved."""

    def __init__(self, params: set[int]) -> None:
        self.params = params
        self.total = 0
        self.teacher_blocks = 0
        self.block_inputs = 0  # what a checkpointed block keeps instead: its inputs
        self._in_block = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in self.params:
            n = t.numel() * t.element_size()
            self.total += n
            if self._in_block:
                self.teacher_blocks += n
        return t

    @contextlib.contextmanager
    def watching(self, blocks: torch.nn.ModuleList):
        def pre(_mod, args):
            if torch.is_grad_enabled() and not self._in_block:  # (read from the run without teacher checkpointing)
                self.block_inputs += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
            self._in_block += 1

        def post(*_):
            self._in_block -= 1

        # always_call: the backward's recomputation of a checkpointed block stops early with an exception
        handles = [
            h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post, always_call=True))
        ]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()


def _one_detail_step(tmp_path, th, data, *, teacher_checkpointing: bool):
    cfg = th.tiny_config(
        "wan", "detail", data, tmp_path / f"run{int(teacher_checkpointing)}", model__tiny_config=TINY4,
        model__gradient_checkpointing="true", export__at_end="false", data__caption_dropout=0,
    )
    tr = DCMTrainer(cfg)
    teacher = tr.models.teacher
    assert teacher.gradient_checkpointing and tr.student_unwrapped.gradient_checkpointing
    if not teacher_checkpointing:
        teacher.disable_gradient_checkpointing()  # the trainer before the fix
    params = {t.untyped_storage().data_ptr() for m in (tr.student_unwrapped, teacher, tr.disc_unwrapped)
              for t in list(m.parameters()) + list(m.buffers())}
    counter = SavedBytes(params)
    with counter.watching(teacher.blocks):
        logs = tr.train_step()
    return counter, logs


def test_teacher_is_checkpointed_in_the_detail_g_step(tmp_path, th):
    data = th.make_dataset(tmp_path / "data", "wan", n=2, t=5, h=16, w=16)
    off, logs_off = _one_detail_step(tmp_path, th, data, teacher_checkpointing=False)
    on, logs_on = _one_detail_step(tmp_path, th, data, teacher_checkpointing=True)
    print(
        f"saved-for-backward bytes of one detail step: teacher not checkpointed {off.total:,} "
        f"(teacher blocks {off.teacher_blocks:,}), checkpointed {on.total:,} (teacher blocks {on.teacher_blocks:,}, block inputs kept {off.block_inputs:,})"
    )
    assert off.teacher_blocks > 0.3 * off.total, "the teacher blocks should be a large share of the step's activations"
    assert on.teacher_blocks == 0
    # the teacher blocks' saved activations are gone; only their inputs are kept (by the checkpoint)
    assert on.total <= off.total - off.teacher_blocks + off.block_inputs
    assert off.block_inputs < 0.1 * off.teacher_blocks
    # the hooks still fired (G / FM losses exist) and checkpointing changed no number of the step
    assert logs_on == logs_off and logs_on["loss_g"] != 0 and logs_on["loss_fm"] > 0


def test_frozen_copy_equals_deepcopy_then_cast():
    """The semantic stage's teacher is cast tensor by tensor while copying: no full fp32 copy, the same tensors."""
    import copy

    from dcm_core.train.models import cast_frozen, freeze, frozen_copy, load_transformer

    model = load_transformer("tiny:wan", tiny_config={"dim": 128, "num_layers": 2, "ffn_dim": 256})
    for dtype in (torch.bfloat16, torch.float32):
        ref = cast_frozen(freeze(copy.deepcopy(model)), dtype)
        got = frozen_copy(model, dtype)
        a, b = ref.state_dict(), got.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            assert b[k].data_ptr() != model.state_dict()[k].data_ptr(), f"{k} shares storage with the student"
        assert not any(p.requires_grad for p in got.parameters()) and not got.training
    assert got.proj_out.weight.dtype == torch.float32 and frozen_copy(model, torch.bfloat16).proj_out.weight.dtype == torch.bfloat16


def test_detail_base_in_bf16_is_an_explicit_opt_in(tmp_path, th):
    """model.detail_base_dtype: fp32 by default even under mixed_precision=bf16 (the teacher is bf16 there);
    'bf16' holds the student's frozen base in bf16 (LoRA, *_lora and diffusers' fp32 modules stay fp32), trains,
    and the export still writes the fp32 base (rebuilt from the checkpoint); 'bf16' without mixed precision is
    refused by name."""
    import pytest
    from safetensors.torch import load_file

    from dcm_core.errors import DCMConfigError
    from dcm_core.train.models import load_transformer

    data = th.make_dataset(tmp_path / "data", "wan", n=2)
    common = dict(mixed_precision="bf16", max_train_steps=1, data__caption_dropout=0)
    default = DCMTrainer(th.tiny_config("wan", "detail", data, tmp_path / "a", export__at_end="false", **common))
    s = default.student_unwrapped
    assert s.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.float32
    assert default.models.teacher.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16  # teacher_dtype auto
    logs_fp32 = default.train_step()

    tr = DCMTrainer(th.tiny_config("wan", "detail", data, tmp_path / "b", model__detail_base_dtype="bf16", **common))
    s = tr.student_unwrapped
    frozen = {n: p.dtype for n, p in s.named_parameters() if not p.requires_grad}
    assert frozen["blocks.0.attn1.to_q.base_layer.weight"] == torch.bfloat16
    assert frozen["blocks.0.scale_shift_table"] == torch.float32  # diffusers' _keep_in_fp32_modules
    assert all(p.dtype == torch.float32 for _, p in tr.trainable)  # LoRA + *_lora: fp32 masters
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)  # noqa: E731
    assert bytes_of(s) < 0.55 * bytes_of(default.student_unwrapped)
    res = tr.train()
    rel = abs(res.history[0]["loss"] - logs_fp32["loss"]) / abs(logs_fp32["loss"])
    print(f"detail loss with the frozen base in bf16 vs fp32: relative difference {rel:.2e}")
    assert 0 < rel < 2e-2
    exported = load_file(res.exported["transformer"])
    base = load_transformer("tiny:wan", tiny_config={"dim": 128, "num_layers": 2, "ffn_dim": 256}).state_dict()
    w = exported["blocks.0.attn1.to_q.base_layer.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, base["blocks.0.attn1.to_q.weight"])
    with pytest.raises(DCMConfigError, match="model.detail_base_dtype"):
        th.tiny_config("wan", "detail", data, tmp_path / "c", model__detail_base_dtype="bf16").resolved("wan")
