"""FSDP2 pieces in THIS process (a one-process gloo group): fast, deterministic checks of what the
two-process tests (test_fsdp.py) can only see through losses and files.

* ``mixed_precision = "bf16"`` → ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: inside a
  block's forward the gathered weights are bf16, the sharded masters and their gradients stay fp32;
  without mixed precision everything stays fp32.
* ``parallel.shard_teacher``: the teacher's blocks become FSDP units, its embedders and head stay
  whole, and the discriminator features (forward hooks + head decode outside the forward) are the
  unsharded teacher's, number for number.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dcm_core.train import fsdp as fs
from dcm_core.train.models import load_transformer

TINY = {"dim": 128, "num_layers": 2, "ffn_dim": 256}


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    return x, ctx


def _gathered_dtypes(model, x, ctx, autocast: bool):
    """dtype of a block's linear weight as the forward sees it, and of the timestep the embedder receives; the
    output (the trainer's forwards run under autocast whenever mixed_precision = bf16)."""
    seen = {}
    lin = model.blocks[0].ffn.net[0].proj
    handles = [
        lin.register_forward_pre_hook(lambda m, a: seen.__setitem__("block", m.weight.dtype)),
        model.condition_embedder.register_forward_pre_hook(lambda m, a: seen.__setitem__("timestep", a[0].dtype)),
    ]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(hidden_states=x, timestep=torch.tensor([501.0]), encoder_hidden_states=ctx, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return seen, out


@pytest.mark.parametrize("mixed", ["bf16", "no"])
def test_fsdp2_gathers_in_bf16_under_mixed_precision(process_group, mixed):
    model = load_transformer("tiny:wan", tiny_config=TINY)
    policy = fs.mixed_precision_policy(mixed)
    assert (policy is None) == (mixed == "no")
    fs.shard_model(model, "wan", torch.device("cpu"), 1, True, policy)
    x, ctx = _inputs()
    seen, out = _gathered_dtypes(model, x, ctx, autocast=mixed == "bf16")
    want = torch.bfloat16 if mixed == "bf16" else torch.float32
    assert seen["block"] == want and out.dtype == want
    # the inputs are not cast by FSDP: t = 501 stays 501 (bf16 would make it 500)
    assert seen["timestep"] == torch.float32
    out.float().square().mean().backward()
    w = model.blocks[0].ffn.net[0].proj.weight
    assert fs.is_sharded(w) and w.dtype == torch.float32  # the masters
    assert w.grad is not None and w.grad.dtype == torch.float32  # reduce_dtype fp32
    if mixed == "bf16":
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


def test_sharded_teacher_blocks_only_and_features_unchanged(process_group):
    from dcm_core.train.discriminator import TeacherFeatures
    from dcm_core.train.models import cast_frozen, freeze

    teacher = cast_frozen(freeze(load_transformer("tiny:wan", tiny_config=TINY)), torch.bfloat16)
    ref = copy.deepcopy(teacher)
    fs.shard_model(teacher, "wan", torch.device("cpu"), 1, True, None, root=False)
    assert all(fs.is_sharded(p) for b in teacher.blocks for p in b.parameters())
    # embedders and head stay whole (decoded outside the forward), in their storage dtypes
    for name in ("proj_out.weight", "scale_shift_table", "condition_embedder.text_embedder.linear_1.weight"):
        p = teacher.get_parameter(name)
        assert not fs.is_sharded(p) and p.dtype == ref.get_parameter(name).dtype, name
    # block parameters keep their storage dtypes (bf16, the _keep_in_fp32_modules fp32): no policy casts them
    dtypes = {n: p.dtype for n, p in teacher.blocks.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in ref.blocks.named_parameters()} and len(set(dtypes.values())) == 2
    x, ctx = _inputs(1)
    x.requires_grad_(True)
    outs = []
    for m in (ref, teacher):
        feats = TeacherFeatures(m, "wan", stride=1)

        def fwd(z, m=m):
            return m(hidden_states=z.to(torch.bfloat16), timestep=torch.tensor([300.0]),
                     encoder_hidden_states=ctx.to(torch.bfloat16), return_dict=False)[0].float()

        o = feats.run(fwd, x)
        (g,) = torch.autograd.grad(sum(d.float().square().mean() for d in o.decoded) + o.velocity.square().mean(), x)
        outs.append((o, g))
    (a, ga), (b, gb) = outs
    # the forward is bit-identical; the backward through the gathered bf16 blocks sums in another order
    assert torch.equal(a.velocity, b.velocity)
    assert all(torch.equal(p, q) for p, q in zip(a.raw + a.decoded, b.raw + b.decoded))
    rel = ((ga - gb).norm() / gb.norm()).item()
    print(f"input-gradient through the sharded bf16 teacher: relative difference {rel:.2e}")
    assert 0 < gb.norm() and rel <= 1e-2  # bf16 rounding (eps 7.8e-3)
