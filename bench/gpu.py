"""GPU benchmark (driven by bench/gpu.sh): the CPU scenarios on one NVIDIA GPU at 480×832×81.

Wan2.1-1.3B-shaped official DCM checkpoint (the same cached file as ``make bench``), loaded by
DCMCheckpointLoader as bf16, latent 1×16×21×60×104 (EmptyHunyuanLatentVideo 832×480, 81 frames,
32 760 tokens), conditioning 8 random tokens, no VAE. Three fresh ComfyUI processes:

1. ``default``  — ComfyUI's default memory management (NORMAL_VRAM);
2. ``lowvram``  — ``--lowvram``;
3. ``lowvram_8gb`` — ``--lowvram --reserve-vram (total − 8 GB)``: what ``--lowvram`` does on an 8 GB card
   (on a large card ``--lowvram`` alone still loads the whole 1.3B model).

Each: load, one warm-up DCMDualExpertSampler run, one round of {DCMDualExpertSampler, the stock
SplitSigmas + 2× SamplerCustomAdvanced chain, SamplerCustomAdvanced + DCMDualExpertGuider} (every model
call timed with ``torch.cuda.synchronize``), and the standard Wan run (50 steps, CFG 5) projected from its
first 2 steps. Reports seconds per step, the expert switch (last semantic call end → first detail call
start), peak VRAM (``torch.cuda.max_memory_allocated`` / ``_reserved`` per run) and the few-step speedup;
writes bench/results/gpu_latest.json and .md.

``--cpu`` runs the same flow on the CPU with the tiny model and a small latent (checks the logic, ~2 min);
``--dry-run`` prints the plan and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .run import RESULTS, log, machine_info, run_worker

GPU_LATENT = "832x480x81"
CPU_LATENT = "64x64x1"
VARIANTS = "dcm_sampler,stock_split_chain,dcm_guider"


def plan(cpu: bool, total_vram_gb: float | None, ckpt: str) -> list[tuple[str, list[str]]]:
    model = ["--model", "tiny"] if cpu else ["--model", "wan1.3b", "--ckpt", ckpt]
    common = [*model, "--weight-dtype", "bf16", "--parts", "load,sampling,rss,standard", "--rounds", "1",
              "--variants", VARIANTS, "--standard-steps", "2", "--latent", CPU_LATENT if cpu else GPU_LATENT]
    if not cpu:
        common += ["--gpu", "--threads", str(min(8, os.cpu_count() or 1))]
    runs = [("default", common), ("lowvram", [*common, "--lowvram"])]
    if total_vram_gb is None or total_vram_gb > 9:
        reserve = max(0.0, (total_vram_gb or 8.0) - 8.0)
        runs.append(("lowvram_8gb", [*common, "--lowvram", "--reserve-vram", f"{reserve:.2f}"]))
    return runs


def summarise(name: str, w: dict) -> dict:
    if "error" in w:
        return {"mode": name, "error": w["error"]}
    rd = (w.get("rounds") or [{}])[0].get("runs", {})
    dcm = rd.get("dcm_sampler", {})
    calls = dcm.get("calls", {})
    out = {"mode": name, "gpu": w.get("gpu"), "tokens": w.get("tokens"), "load_s": w["load"]["wall"]}
    if calls.get("n"):
        out["s_per_step_dcm"] = dcm["wall"] / calls["n"]
        out["s_per_call_median"] = statistics.median(calls["wall"])
        out["switch_s"] = calls.get("switch_wall")
        out["switch_over_call"] = (calls["switch_wall"] / statistics.median(calls["wall"])) if calls.get("switch_wall") is not None else None
        out["overhead"] = dcm["wall"] / calls["sum_wall"]
        out["vram_peak_allocated"] = dcm.get("vram_peak_allocated")
        out["vram_peak_reserved"] = dcm.get("vram_peak_reserved")
        if calls.get("loaded_fraction"):  # share of the weights ComfyUI kept on the GPU during the calls
            out["weights_on_gpu_fraction"] = min(calls["loaded_fraction"])
            out["partially_loaded"] = any(calls["lowvram"])
    for v in ("stock_split_chain", "dcm_guider"):
        if v in rd and dcm:
            out[f"dcm_over_{v}"] = dcm["wall"] / rd[v]["wall"]
            out[f"vram_peak_allocated_{v}"] = rd[v].get("vram_peak_allocated")
    st = (w.get("standard") or [None])[0]
    if st:
        sc = st["standard"]["calls"]["wall"]
        fixed = st["standard"]["wall"] - sum(sc)
        projected = fixed + 50 * statistics.mean(sc)
        out["standard_s_per_step"] = statistics.mean(sc)
        out["standard_projected_s"] = projected
        out["dcm_s"] = st["dcm"]["wall"]
        out["speedup_projected"] = projected / st["dcm"]["wall"]
    out["rss_peak_process"] = w.get("rss_peak_process")
    return out


def render(R: dict) -> str:
    M = R["machine"]
    gpu = next((s.get("gpu") for s in R["summary"] if s.get("gpu")), None) or {}
    head = (f"# DCM node pack benchmarks (GPU)\n\n{M['date']} · {gpu.get('name', 'CPU (--cpu check)')} · "
            f"{M['cpu_model']} · torch {M['torch']} · ComfyUI {M['comfyui_version']} · latent {R['latent']} · "
            f"total {R['total_s'] / 60:.1f} min\n\n")
    rows = ["| Mode | s/step (DCM) | switch s (÷ call) | DCM ÷ stock chain | peak VRAM alloc / reserved | weights on GPU | "
            "standard 50×CFG5 s/step | speedup (projected) |", "|---|---|---|---|---|---|---|---|"]

    def f(x, nd=2):
        return "—" if x is None else f"{x:.{nd}f}"

    for s in R["summary"]:
        if "error" in s:
            rows.append(f"| {s['mode']} | failed: {s['error']} | | | | | | |")
            continue
        va, vr = s.get("vram_peak_allocated"), s.get("vram_peak_reserved")
        frac = s.get("weights_on_gpu_fraction")
        on_gpu = "—" if frac is None else f"{100 * frac:.0f} %"
        vram = "—" if va is None else f"{va / 2**30:.2f} / {vr / 2**30:.2f} GiB"
        rows.append(f"| {s['mode']} | {f(s.get('s_per_step_dcm'))} | {f(s.get('switch_s'))} ({f(s.get('switch_over_call'))}) | "
                    f"{f(s.get('dcm_over_stock_split_chain'), 3)} | {vram} | "
                    f"{on_gpu} | "
                    f"{f(s.get('standard_s_per_step'))} | "
                    f"{f(s.get('speedup_projected'), 1)}× |")
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run the flow on the CPU with the tiny model (logic check)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--tag", default=None, help="results stem (default gpu_latest, or gpu_cpu_check with --cpu)")
    ap.add_argument("--timeout", type=float, default=170, help="seconds per process")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    total_gb = None
    if not a.cpu:
        import torch

        if torch.cuda.is_available():
            total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        elif not a.dry_run:
            print("bench/gpu.py: no CUDA device visible to torch (use --cpu for the CPU logic check)", file=sys.stderr)
            return 2
    ckpt = ""
    if not a.cpu and not a.dry_run:
        from .models import ensure_wan_1_3b

        path, man = ensure_wan_1_3b(log=log)
        ckpt = str(path)
    runs = plan(a.cpu, total_gb, ckpt or "<cache>/dcm_bench_wan1.3b_official_fp32.safetensors")
    if a.dry_run:
        for name, args in runs:
            print(f"{name}: python -m bench.worker_comfy {' '.join(args)} --out <work>/{name}.json")
        return 0
    work = Path(tempfile.mkdtemp(prefix="dcm_bench_gpu_"))
    R: dict = {"machine": machine_info(), "latent": CPU_LATENT if a.cpu else GPU_LATENT, "cpu_check": a.cpu,
               "workers": {}, "summary": []}
    for name, args in runs:
        log(f"{name}: {' '.join(args)}")
        w = run_worker("worker_comfy", args, work, name, a.timeout)
        R["workers"][name] = w
        R["summary"].append(summarise(name, w))
    R["total_s"] = time.perf_counter() - t0
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    tag = a.tag or ("gpu_cpu_check" if a.cpu else "gpu_latest")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(R, indent=1, default=str))
    md = render(R)
    (RESULTS / f"{tag}.md").write_text(md)
    print(md)
    return 0 if all("error" not in s for s in R["summary"]) else 1


if __name__ == "__main__":
    sys.exit(main())
