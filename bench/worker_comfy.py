"""One benchmark process: real ComfyUI in-process, one model, several scenarios; writes a JSON file.

Run by :mod:`bench.run` in a fresh subprocess per model / dtype so memory peaks never mix::

    python -m bench.worker_comfy --model tiny --out /tmp/tiny.json
    python -m bench.worker_comfy --model wan1.3b --ckpt FILE --weight-dtype bf16 --parts load,rss --out x.json

Parts:

* ``load``     — run only DCMCheckpointLoader (through a prompt): wall/CPU time, RSS peak of the phase,
  model and expert sizes;
* ``sampling`` — warm-up, then ``--rounds`` rounds of the dual-expert variants (:data:`prompts.DUAL_VARIANTS`,
  order rotated per round, a new seed per round shared by all variants), every model call timed;
* ``rss``      — RSS peak of one DCMDualExpertSampler run (a part of ``sampling`` if both are given);
* ``standard`` — the same base sampled the standard Wan way (50 steps, CFG 5, euler), fully
  (``--standard-steps 50``) or its first N steps for a projection, next to a DCM run on the same latent
  (``--standard-latent``, default the sampling latent);
* ``stock_loaders`` — the chain on stock UNETLoader + LoraLoaderModelOnly (needs converted files: tiny).

Times are wall (``perf_counter``) and process CPU time (``process_time``): on a shared machine the CPU
times are the robust ones (other processes stretch wall time, not CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _calls_summary(calls: list) -> dict:
    """Per-run call statistics from DCMBenchCallTimer records."""
    if not calls:
        return {"n": 0}
    wall = [c[2] - c[1] for c in calls]
    cpu = [c[4] - c[3] for c in calls]
    out = {
        "n": len(calls),
        "batches": [c[5] for c in calls],
        "tags": [c[0] for c in calls],
        "timesteps": [round(c[6], 3) for c in calls],
        "wall": wall,
        "cpu": cpu,
        "sum_wall": sum(wall),
        "sum_cpu": sum(cpu),
        "lowvram": [c[7] for c in calls],
        "loaded_fraction": [c[8] / max(1, c[9]) for c in calls],
    }
    sem = [c for c in calls if c[0] == "semantic"]
    det = [c for c in calls if c[0] == "detail"]
    if sem and det:
        last_sem = max(sem, key=lambda c: c[2])
        first_det = min(det, key=lambda c: c[1])
        out["switch_wall"] = first_det[1] - last_sem[2]
        out["switch_cpu"] = first_det[3] - last_sem[4]
        out["first_call"] = calls[0][1]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "wan1.3b"), required=True)
    ap.add_argument("--ckpt", default=None, help="official DCM file (wan1.3b)")
    ap.add_argument("--weight-dtype", default="default")
    ap.add_argument("--parts", default="load,sampling,rss,standard")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latent", default=None, help="WxHxLENGTH (pixels/frames as EmptyHunyuanLatentVideo takes them)")
    ap.add_argument("--standard-steps", type=int, default=50, help="steps of the standard run actually sampled (≤ 50)")
    ap.add_argument("--standard-latent", default=None, help="WxHxLENGTH for the standard-vs-DCM part (default: --latent)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pack", default=None, help="node pack folder to load instead of this repo (before/after runs)")
    ap.add_argument("--gpu", action="store_true", help="do not pass --cpu to ComfyUI")
    ap.add_argument("--lowvram", action="store_true")
    ap.add_argument("--reserve-vram", type=float, default=None, help="GB ComfyUI keeps free (emulates a smaller card)")
    ap.add_argument("--variants", default=None, help="comma list of dual-expert variants (default: all)")
    ap.add_argument("--stock-files", default=None, help="SEMANTIC,DETAIL converted files for the stock-loader chain (wan1.3b)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))

    from . import rss
    from .comfy_env import boot, pack_module
    from .prompts import DUAL_VARIANTS, Graph, Latent

    res: dict = {"model": a.model, "weight_dtype": a.weight_dtype, "threads": a.threads, "parts": sorted(parts),
                 "pack": os.path.realpath(a.pack) if a.pack else None}
    mon = rss.Monitor().__enter__()
    t0 = time.perf_counter()
    h = boot(pack=a.pack, cpu=not a.gpu, lowvram=a.lowvram, reserve_vram=a.reserve_vram, threads=a.threads)
    import comfy.model_management as mm
    import comfy.utils
    import torch

    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False
    cuda = a.gpu and torch.cuda.is_available()
    if cuda:
        res["gpu"] = {"name": torch.cuda.get_device_name(), "total_vram": torch.cuda.get_device_properties(0).total_memory,
                      "vram_state": str(mm.vram_state), "extra_reserved": mm.extra_reserved_memory()}
    res["boot_s"] = time.perf_counter() - t0
    rss.trim()
    res["rss_after_boot"] = rss.read_status()
    res["torch_device"] = str(mm.get_torch_device())
    calls_log = nodes.NODE_CLASS_MAPPINGS["DCMBenchCallTimer"].CALLS
    store = nodes.NODE_CLASS_MAPPINGS["DCMBenchCapture"].STORE
    sinks = nodes.NODE_CLASS_MAPPINGS["DCMBenchModelSink"].STORE

    stock_files = None
    tiny_dir = None
    if a.model == "tiny":
        from .models import write_tiny

        d = tiny_dir = Path(tempfile.mkdtemp(prefix="dcm_bench_tiny_"))
        names = write_tiny(d)
        ckpt = h.link_model("diffusion_models", d / "diffusion_models" / names["official"])
        stock_files = (h.link_model("diffusion_models", d / "diffusion_models" / names["semantic"]),
                       h.link_model("loras", d / "loras" / names["detail"]))
        latent = Latent(128, 128, 9)  # 1×16×3×16×16
    else:
        ckpt = h.link_model("diffusion_models", Path(a.ckpt))
        latent = Latent(64, 64, 1)  # 1×16×1×8×8
        if a.stock_files:
            sem_f, det_f = a.stock_files.split(",")
            stock_files = (h.link_model("diffusion_models", Path(sem_f)), h.link_model("loras", Path(det_f)))
    if a.latent:
        w, hh, ln = (int(x) for x in a.latent.lower().split("x"))
        latent = Latent(w, hh, ln)
    res["latent_shape"] = list(latent.shape)
    res["tokens"] = latent.tokens
    g = Graph(ckpt, a.weight_dtype, latent, stock_files=stock_files if "stock_loaders" in parts else None)

    def run(prompt: dict, *, reset: bool = False) -> dict:
        """Execute; with ``reset``, also time unloading every model afterwards (so each run starts from
        the same state and pays for leaving the shared weights as it found them: a stock chain leaves the
        detail clone loaded, which the next run's semantic load would otherwise pay for)."""
        calls_log.clear()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        c0 = time.process_time()
        wall = h.run(prompt)
        out = {"wall": wall, "cpu": time.process_time() - c0, "calls": _calls_summary(list(calls_log))}
        if cuda:
            out["vram_peak_allocated"] = torch.cuda.max_memory_allocated()
            out["vram_peak_reserved"] = torch.cuda.max_memory_reserved()
        if reset:
            t1, c1 = time.perf_counter(), time.process_time()
            mm.unload_all_models()
            mm.soft_empty_cache()
            out["reset_wall"], out["reset_cpu"] = time.perf_counter() - t1, time.process_time() - c1
        return out

    # ---- loading
    rss.trim()
    with mon.phase() as ph:
        c0 = time.process_time()
        load_wall = h.run(g.load_only())
        load_cpu = time.process_time() - c0
    rss.trim()
    loading = pack_module("dcm_core.comfy_adapter.loading")
    entry = next(iter(loading._CHECKPOINTS.values()))
    expert_bytes = sum(t.numel() * t.element_size() for t in entry.detail.patches.values())
    res["load"] = {
        "wall": load_wall, "cpu": load_cpu, "rss": ph, "after_trim": rss.read_status(),
        "model_bytes": sinks["semantic"]["model_size"], "model_dtype": sinks["semantic"]["dtype"],
        "expert_bytes": expert_bytes, "detail_weight_patches": sinks["detail"]["patches"],
        "file_bytes": os.path.getsize(os.path.realpath(h.model_dir("diffusion_models") / ckpt)),
    }
    if cuda:
        res["load"]["vram_after"] = torch.cuda.memory_allocated()

    outs: dict = {}
    if parts & {"sampling", "rss"}:
        rss.trim()
        with mon.phase() as ph:
            first = run(g.dcm_sampler(0))
        res["rss_run"] = {"first_run": first, "rss": ph}

    if "sampling" in parts:
        rounds = []
        variants = list(DUAL_VARIANTS) if not a.variants else a.variants.split(",")
        variants += ["stock_loaders_chain"] if "stock_loaders" in parts else []
        if "stock_loaders" in parts:
            h.run(g.stock_load_only())  # load the stock models once, outside the timed runs
        mm.unload_all_models()
        for r in range(a.rounds):
            seed = 1000 + r
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            rec = {"seed": seed, "order": order, "runs": {}}
            for v in order:
                rec["runs"][v] = run(getattr(g, v)(seed), reset=True)
                outs[v] = store[v].clone()
            ref = outs.get("dcm_sampler")
            rec["max_abs_diff_vs_dcm_sampler"] = {} if ref is None else {
                v: float((outs[v].to(ref.device) - ref).abs().max()) for v in outs if v != "dcm_sampler"}
            rounds.append(rec)
        res["rounds"] = rounds

    if "standard" in parts:
        k = max(1, min(50, a.standard_steps))
        gs = g
        if a.standard_latent:
            w, hh, ln = (int(x) for x in a.standard_latent.lower().split("x"))
            gs = Graph(ckpt, a.weight_dtype, Latent(w, hh, ln), stock_files=g.stock_files)
        res["standard_latent_shape"], res["standard_tokens"] = list(gs.latent.shape), gs.latent.tokens
        std = []
        for r in range(max(1, a.rounds if k == 50 else 1)):
            seed = 2000 + r
            dcm = run(gs.dcm_sampler(seed), reset=True)
            st = run(gs.standard_wan(seed, end_at_step=None if k == 50 else k), reset=True)
            std.append({"dcm": dcm, "standard": st, "measured_steps": k})
        res["standard"] = std

    mon.__exit__(None, None, None)
    res["rss_peak_process"] = rss.read_status()["hwm"]
    Path(a.out).write_text(json.dumps(res, indent=1))
    import shutil

    shutil.rmtree(h.base, ignore_errors=True)  # the temporary ComfyUI base (symlinks, outputs)
    if tiny_dir is not None:
        shutil.rmtree(tiny_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
