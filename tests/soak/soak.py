"""The soak: one real ComfyUI server under a long seeded queue (issue 15), driven over HTTP + websocket.

What one :func:`run_soak` does (all loopback, seeded, bounded in count and time, servers killed in a
``finally``):

* **two servers** (tests/browser/comfy_server.py): the *soak* server, and a *reference* server started
  with ``--cache-none`` that runs each distinct prompt alone, one at a time, after the soak (the
  reference prompt first, in a fresh process). Reference results are cached on disk by a hash of the
  prompt, the pack's sources, the model files and the ComfyUI commit (tests/_output/soak/refs.json).
* **long queue** from the API twins (tests/comfy/workflows_api): the one-node DCM sampler (Wan and
  HunyuanVideo), the DCM guider with stock UNETLoader / LoraLoaderModelOnly / SamplerCustomAdvanced,
  and the toy world; random seeds, presets, boundaries, cfg, batch sizes, an optional style LoRA. Every
  output latent (stock ``SaveLatent``) must be bit-identical to the reference server's.
* **interrupts**: ``/interrupt`` (targeted by prompt id) on arrival of the loader's ``executing``
  message, on a random step's ``progress``, on the step before the expert switch, or after a random
  delay. After each one that landed, the reference prompt R runs next (queued at the front) and must be
  bit-identical; R also reports the SHA-256 of both experts' effective weights (test node
  ``DCMSoakDigest``), which must equal a fresh server's: no expert patch stays applied.
* **model files changing** under the server: ``soak_swap.safetensors`` replaced (atomic rename, then
  overwritten in place) by another checkpoint of the same size → the next run uses it; deleted →
  refused or a node error naming the file, and the server keeps serving; truncated → an error naming it.
* **two websocket clients** queue interleaved prompts; each must see its own prompts' messages and
  previews (``--preview-method latent2rgb``, previews with metadata) and none of the other's.
* **memory**: server RSS after every finished run; growth after the warm-up runs must stay ≤ 5 %.
* **bad requests** at ``/prompt`` (wrong types, out-of-range widgets, unknown nodes / ids, missing model
  files, NaN boundary, bad custom sigmas): refused with HTTP 400 and the expected message (the pack's
  own for the inputs it validates); the server log must hold no traceback through pack code except
  the node errors of the swap cases, each ending in a ``DCM…Error``.

Figures and the RSS plot land in tests/_output/soak/ (``soak-short.json`` / ``soak-full.json``,
``rss-short.png`` / ``rss-full.png``, the last run's server logs).
Used by tests/soak/test_soak.py (short form in ``make test``; ``DCM_SOAK_FULL=1`` / ``make soak``).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "tests" / "_output" / "soak"
SOAK_NODES = HERE / "soak_nodes"


from tools.pathimport import load_path_module  # noqa: E402  (the repo root is on sys.path: pytest / PYTHONPATH)

# the browser / cli tiers' server helpers, under the name they load it by
cs = load_path_module("dcm_comfy_server", ROOT / "tests" / "browser" / "comfy_server.py")

SWAP_NAME = "soak_swap.safetensors"
SWAP_A, SWAP_B = "soak_swap_a.safetensors", "soak_swap_b.safetensors"
SAVE = "900"  # SaveLatent node id in every soak prompt
SERVER_FLAGS = ("--preview-method", "latent2rgb")
#: Failure categories (one test each in tests/soak/test_soak.py).
CATEGORIES = ("queue", "interrupts", "swaps", "clients", "memory", "bad_requests", "server_log")


@dataclass
class SoakConfig:
    seed: int
    prompts: int  # long-queue runs (interrupt targets included; the R checks after interrupts are extra)
    interrupts: int  # interrupts that must land
    swap_cycles: int
    distinct: int  # size of the random prompt pool the queue draws from
    warmup: int = 20  # runs before the RSS baseline
    rss_limit_pct: float = 5.0
    pace_ms: int = 8  # DCMSoakPace: sleep per model call, so an interrupt lands where it was aimed
    time_limit_s: float = 420.0  # hard bound (server boots included); the short form takes ~1–2 min on 2 idle cores

    @classmethod
    def short(cls) -> SoakConfig:
        return cls(seed=15, prompts=30, interrupts=10, swap_cycles=1, distinct=8, time_limit_s=420.0)

    @classmethod
    def full(cls) -> SoakConfig:
        return cls(seed=1515, prompts=200, interrupts=50, swap_cycles=4, distinct=40, time_limit_s=3000.0)


# --------------------------------------------------------------------------- prompts


def _twin(name: str) -> dict:
    return json.loads((cs.API_WORKFLOWS / f"{name}.json").read_text())


def _finish(prompt: dict, source: str) -> dict:
    """Drop the in-process capture node, save the output latent as ``SAVE``."""
    for nid in [k for k, v in prompt.items() if v["class_type"] == "DCMTestCapture"]:
        del prompt[nid]
    prompt[SAVE]["inputs"]["filename_prefix"] = f"soak/{source}"
    return prompt


def _pace(prompt: dict, src: list, nid: str, ms: int) -> list:
    prompt[nid] = {"class_type": "DCMSoakPace", "inputs": {"model": src, "ms": ms}}
    return [nid, 0]


def make_variant(kind: str, rng: random.Random, pace_ms: int, *, default: bool = False) -> dict:
    """One prompt of ``kind`` with random settings (``default``: the twin's own settings)."""

    def pick(*options):
        return options[0] if default else rng.choice(options)

    cfg = (lambda: 1.0) if default else (lambda: rng.choice([1.0, 1.0, 1.5, 3.0]))
    batch = 1 if default else rng.choice([1, 1, 2])
    if kind in ("wan_sampler", "hy_sampler"):
        wan = kind == "wan_sampler"
        p = _twin("dcm_wan2.1_t2v_1.3b" if wan else "dcm_hunyuan_t2v")
        loader, sampler, latent = ("3", "7", "4") if wan else ("3", "8", "4")
        s = p[sampler]["inputs"]
        if not default:
            s["seed"] = rng.randrange(2**32)
            s["preset"] = pick(*(["wan2.1-t2v-6step", "per-expert-uniform", "pcm-default"] if wan
                                 else ["hunyuan-t2v-4step", "per-expert-uniform"]))  # fmt: skip
            s["boundary_timestep"] = pick(s["boundary_timestep"], s["boundary_timestep"], float(rng.randrange(900, 996)))
            s["cfg_semantic"], s["cfg_detail"] = cfg(), cfg()
        p[latent]["inputs"]["batch_size"] = batch
        for cond in [k for k, v in p.items() if v["class_type"] == "DCMTestConditioning"]:
            p[cond]["inputs"]["batch"] = batch
        s["semantic_model"] = _pace(p, [loader, 0], "950", pace_ms)
        s["detail_model"] = _pace(p, [loader, 1], "951", pace_ms)
        return _finish(p, kind)
    if kind == "wan_guider_stock":
        p = _twin("dcm_wan2.1_stock_nodes")
        if not default:
            p["13"]["inputs"]["noise_seed"] = rng.randrange(2**32)
            sch = p["9"]["inputs"]
            sch["preset"] = pick("wan2.1-t2v-6step", "per-expert-uniform", "pcm-default")
            sch["semantic_steps"], sch["detail_steps"], sch["steps"] = rng.randint(1, 3), rng.randint(1, 4), rng.randint(3, 8)
            b = pick(978.0, 978.0, float(rng.randrange(900, 996)))
            sch["boundary_timestep"] = p["11"]["inputs"]["boundary_timestep"] = b
            p["11"]["inputs"]["cfg_semantic"], p["11"]["inputs"]["cfg_detail"] = cfg(), cfg()
            p["12"]["inputs"]["sampler_name"] = pick("euler", "euler", "euler_ancestral")
            if rng.random() < 0.5:  # the style LoRA bypassed, as the UI workflow ships it
                p["11"]["inputs"]["detail_model"] = ["2", 0]
                del p["3"]
        p["6"]["inputs"]["batch_size"] = batch
        for cond in ("7", "8"):
            p[cond]["inputs"]["batch"] = batch
        paced = _pace(p, ["1", 0], "950", pace_ms)
        p["2"]["inputs"]["model"] = paced
        p["11"]["inputs"]["semantic_model"] = paced
        return _finish(p, kind)
    if kind == "toy":
        p = _twin("dcm_toy_world")
        for nid in ("6", "7", "9"):  # decode + WEBP: the latent is what is compared
            del p[nid]
        p["4"]["inputs"].update(width=48, height=48, length=9, batch_size=batch)
        if not default:
            p["5"]["inputs"]["seed"] = rng.randrange(2**32)
            p["5"]["inputs"]["cfg_semantic"], p["5"]["inputs"]["cfg_detail"] = cfg(), cfg()
            from dcm_core.toy.world import all_prompts

            p["2"]["inputs"]["prompt"] = rng.choice(all_prompts())
        p["5"]["inputs"]["semantic_model"] = _pace(p, ["1", 0], "950", pace_ms)
        p["5"]["inputs"]["detail_model"] = _pace(p, ["1", 1], "951", pace_ms)
        p[SAVE] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "x"}}
        return _finish(p, kind)
    raise ValueError(kind)


KINDS = ("wan_sampler", "hy_sampler", "wan_guider_stock", "toy")


def reference_prompt(pace_ms: int, ckpt: str = "dcm_tiny_wan.safetensors") -> dict:
    """R: the Wan DCM sampler twin as shipped, plus the weight digests of both experts (loader outputs) and
    of the converted semantic-expert file loaded by stock UNETLoader (the shared weights must equal it)."""
    p = make_variant("wan_sampler", random.Random(0), pace_ms, default=True)
    p["3"]["inputs"]["ckpt_name"] = ckpt
    p["960"] = {"class_type": "DCMSoakDigest", "inputs": {"model": ["3", 0], "label": "semantic"}}
    p["961"] = {"class_type": "DCMSoakDigest", "inputs": {"model": ["3", 1], "label": "detail"}}
    if ckpt == "dcm_tiny_wan.safetensors":  # the converted semantic expert of the same checkpoint, stock loader
        p["962"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "dcm_tiny_wan_semantic.safetensors",
                                                           "weight_dtype": "default"}}  # fmt: skip
        p["963"] = {"class_type": "DCMSoakDigest", "inputs": {"model": ["962", 0], "label": "semantic file"}}
    p[SAVE]["inputs"]["filename_prefix"] = "soak/R" if ckpt.startswith("dcm_tiny") else "soak/S"
    return p


def prompt_key(prompt: dict) -> str:
    """Identity of a prompt for the reference cache: everything but the output file prefix."""
    p = copy.deepcopy(prompt)
    p[SAVE]["inputs"]["filename_prefix"] = "-"
    return hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:20]


def sampler_plan(prompt: dict) -> dict:
    """Where the interesting moments are: loader node id, step count, steps before the expert switch."""
    from dcm_core import schedule

    info = {"loader": None, "steps": None, "switch": None}
    for nid, node in prompt.items():
        ct, ins = node["class_type"], node["inputs"]
        if ct in ("DCMCheckpointLoader", "UNETLoader"):
            info["loader"] = nid
        if ct == "DCMDualExpertSampler":
            if isinstance(ins.get("sigmas"), list):  # a linked DCMSchedule node gives the plan (preset ignored)
                continue
            sig = schedule.build_sigmas(ins["preset"], boundary_timestep=ins["boundary_timestep"])
            b = ins["boundary_timestep"]
        elif ct == "DCMSchedule":
            sig = schedule.build_sigmas(
                ins["preset"], steps=ins["steps"], semantic_steps=ins["semantic_steps"],
                detail_steps=ins["detail_steps"], boundary_timestep=ins["boundary_timestep"],
                custom_sigmas=ins["custom_sigmas"],
            )  # fmt: skip
            b = ins["boundary_timestep"]
        else:
            continue
        sem, _ = schedule.split_sigmas(sig, b)
        info["steps"], info["switch"] = len(sig) - 1, len(sem) - 1
    return info


# --------------------------------------------------------------------------- bad requests


def bad_requests(pace_ms: int) -> list[tuple[str, object, list[str]]]:
    """(name, request body, fragments the 400 answer must contain). Bodies are /prompt JSON (or raw bytes)."""
    from dcm_core import schedule

    def r(mut):  # one output (SaveLatent) that depends on the broken node: the whole prompt must be refused
        p = make_variant("wan_sampler", random.Random(0), pace_ms, default=True)
        mut(p)
        return {"prompt": p}

    def boundary_msg(value) -> str:
        try:
            schedule.validate_boundary(value)
        except Exception as e:  # noqa: BLE001 - the pack's own message
            return str(e)
        raise AssertionError(f"validate_boundary({value!r}) accepted it")

    def custom_msg(text: str) -> str:
        try:
            schedule.parse_custom_sigmas(text)
        except Exception as e:  # noqa: BLE001
            return str(e)
        raise AssertionError(f"parse_custom_sigmas({text!r}) accepted it")

    def stock(mut):
        p = make_variant("wan_guider_stock", random.Random(0), pace_ms, default=True)
        del p["10"]  # the schedule plot preview is an output that would stay valid
        mut(p)
        return {"prompt": p}

    def upd(node, **kw):
        return lambda p: p[node]["inputs"].update(kw)

    return [
        ("seed is text", r(upd("7", seed="forty")), ["seed", "forty"]),
        ("cfg as a list", r(upd("7", cfg_semantic=[1, 2, 3])), ["cfg_semantic"]),
        ("conditioning into latent_image", r(upd("7", latent_image=["5", 0])), ["latent_image", "mismatch"]),
        ("cfg_semantic 500 > max", r(upd("7", cfg_semantic=500.0)), ["cfg_semantic", "bigger than max"]),
        ("boundary 1500 (pack check)", r(upd("7", boundary_timestep=1500.0)), [boundary_msg(1500.0)]),
        ("boundary NaN (pack check)", r(upd("7", boundary_timestep=float("nan"))), [boundary_msg(float("nan"))]),
        ("unknown preset", r(upd("7", preset="wan9-99step")), ["preset", "wan9-99step"]),
        ("unknown weight_dtype", r(upd("3", weight_dtype="fp4")), ["weight_dtype", "fp4"]),
        ("negative seed", r(upd("7", seed=-1)), ["seed", "smaller than min"]),
        ("schedule custom sigmas garbage (pack check)",
         stock(upd("9", preset="custom", custom_sigmas="1.0, banana")), [custom_msg("1.0, banana")]),  # fmt: skip
        ("schedule boundary NaN (pack check)", stock(lambda p: (p["9"]["inputs"].update(boundary_timestep=float("nan")))),
         [boundary_msg(float("nan"))]),  # fmt: skip
        ("unknown node type", r(lambda p: p.update({"77": {"class_type": "DCMNoSuchNode", "inputs": {}}})),
         ["DCMNoSuchNode"]),  # fmt: skip
        ("link to an unknown node id", r(upd("7", semantic_model=["12345", 0])), ["12345"]),
        ("missing checkpoint file", r(upd("3", ckpt_name="dcm_missing.safetensors")), ["dcm_missing.safetensors"]),
        ("missing detail-expert LoRA", stock(upd("2", lora_name="missing_detail_expert.safetensors")),
         ["missing_detail_expert.safetensors"]),  # fmt: skip
        ("missing pack detail-expert file",
         stock(lambda p: p.update({"2": {"class_type": "DCMExpertLoraLoader", "inputs": {
             "model": p["2"]["inputs"]["model"], "lora_name": "missing_expert.safetensors", "strength": 1.0}}})),
         ["missing_expert.safetensors"]),  # fmt: skip
        ("missing required input", r(lambda p: p["7"]["inputs"].pop("positive")), ["positive"]),
        ("strength 1e6 > max", stock(upd("2", strength_model=1e6)), ["strength_model", "bigger than max"]),
        ("no output node", r(lambda p: p.pop(SAVE)), ["output"]),
        ("empty prompt", {"prompt": {}}, ["output"]),
    ]


# --------------------------------------------------------------------------- results


@dataclass
class Run:
    idx: int
    client: str
    kind: str  # variant kind, "R" (reference), "S" (swap), or "bad"
    key: str
    prompt_id: str = ""
    status: str = ""  # success / error / interrupted / refused
    error: str = ""
    interrupt: dict | None = None  # {"aim": ..., "landed": bool, "node_type": ...}
    latent_sha: str | None = None
    digests: dict = field(default_factory=dict)
    expect_key: str | None = None  # reference key to compare with (None: no comparison)
    expect_error: list[str] | None = None  # fragments the error must contain
    previews: int = 0
    progress: int = 0
    seconds: float = 0.0
    rss: int | None = None
    note: str = ""


class Failure(Exception):
    pass


class WSClient:
    """One websocket client: its own clientId, the messages and previews it receives, per prompt."""

    def __init__(self, name: str, url: str, session):
        self.name, self.url, self.session = name, url, session
        self.client_id = f"soak-{name}-{uuid.uuid4().hex[:8]}"
        self.events: dict[str, list] = {}  # prompt_id → [(type, data)]
        self.previews: dict[str, int] = {}  # prompt_id → previews with metadata
        self.unattributed_previews = 0
        self.done: dict[str, asyncio.Event] = {}
        self.final: dict[str, tuple[str, dict]] = {}
        self.triggers: dict[str, callable] = {}
        self.ws = None
        self.task = None

    def _event(self, pid: str) -> asyncio.Event:
        return self.done.setdefault(pid, asyncio.Event())

    async def connect(self):
        self.ws = await self.session.ws_connect(f"{self.url}/ws?clientId={self.client_id}", heartbeat=30)
        await self.ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        self.task = asyncio.create_task(self._read())

    async def _read(self):
        import aiohttp

        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                m = json.loads(msg.data)
                typ, data = m.get("type"), m.get("data") or {}
                pid = data.get("prompt_id")
                if not pid:
                    continue
                self.events.setdefault(pid, []).append((typ, data))
                trig = self.triggers.get(pid)
                if trig is not None:
                    trig(typ, data)
                if typ in ("execution_success", "execution_error", "execution_interrupted"):
                    self.final[pid] = (typ, data)
                    self._event(pid).set()
            elif msg.type == aiohttp.WSMsgType.BINARY:
                (kind,) = struct.unpack(">I", msg.data[:4])
                if kind == 4:  # PREVIEW_IMAGE_WITH_METADATA
                    (n,) = struct.unpack(">I", msg.data[4:8])
                    meta = json.loads(msg.data[8 : 8 + n])
                    pid = meta.get("prompt_id", "")
                    self.previews[pid] = self.previews.get(pid, 0) + 1
                else:
                    self.unattributed_previews += 1
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break

    async def close(self):
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            self.task.cancel()


class Soak:
    def __init__(self, cfg: SoakConfig, work: Path, log=print):
        self.cfg, self.work, self.log = cfg, work, log
        self.rng = random.Random(cfg.seed)
        self.runs: list[Run] = []
        self.rss: list[tuple[int, int]] = []  # (run index, bytes)
        self.bad: list[dict] = []
        self.swaps: list[dict] = []
        self.failures: dict[str, list[str]] = {c: [] for c in CATEGORIES}
        self.collateral: list[str] = []
        self.prompts: dict[str, dict] = {}  # key → prompt (for the reference server)
        self.t0 = time.monotonic()
        self.server = None
        self.ref_server = None
        self._session = None

    # ------------------------------------------------------------------ setup
    def build_bases(self) -> tuple[Path, Path]:
        bases = []
        for name in ("soak_base", "ref_base"):
            base = self.work / name
            cs.make_base(base)
            os.symlink(SOAK_NODES, base / "custom_nodes" / "dcm_soak_nodes")
            bases.append(base)
        return bases[0], bases[1]

    def swap_files(self, models: list[Path]) -> None:
        """Two tiny Wan DCM checkpoints of the same size (other seeds) for the swap cases."""
        from dcm_core import tiny

        src = self.work / "swap_src"
        src.mkdir(exist_ok=True)
        for name, seed in ((SWAP_A, 11), (SWAP_B, 12)):
            model = tiny.make_official_model("wan", tiny.wan_config(num_layers=2), rank=4, alpha=8.0, seed=seed)
            tiny.save_official_checkpoint(model, src / name, metadata={"lora_alpha": "8"})
        a, b = (src / SWAP_A).read_bytes(), (src / SWAP_B).read_bytes()
        assert len(a) == len(b) and a != b, "swap checkpoints must differ in content, not in size"
        self.swap_bytes = {"a": a, "b": b}
        for d in models:
            (d / "diffusion_models" / SWAP_A).write_bytes(a)
            (d / "diffusion_models" / SWAP_B).write_bytes(b)
        self.swap_path = models[0] / "diffusion_models" / SWAP_NAME
        self.swap_path.write_bytes(a)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def check_time(self):
        if self.elapsed() > self.cfg.time_limit_s:
            raise Failure(f"soak ran past its time limit of {self.cfg.time_limit_s:.0f} s")

    # ------------------------------------------------------------------ running prompts
    async def post_prompt(self, client: WSClient, prompt: dict, *, front: bool = False) -> tuple[int, dict]:
        body = {"prompt": prompt, "client_id": client.client_id}
        if front:
            body["front"] = True
        async with self._session.post(f"{self.server.url}/prompt", data=json.dumps(body),
                                      headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
            return resp.status, await resp.json(content_type=None)

    async def queue(self, client: WSClient, kind: str, prompt: dict, *, expect_key=None, expect_error=None,
                    interrupt: dict | None = None, front: bool = False) -> Run:  # fmt: skip
        run = Run(idx=len(self.runs), client=client.name, kind=kind, key=prompt_key(prompt))
        self.runs.append(run)
        run.expect_key, run.expect_error = expect_key, expect_error
        run._t = time.monotonic()
        pid = str(uuid.uuid4())
        run.prompt_id = pid
        prompt = copy.deepcopy(prompt)
        prompt[SAVE]["inputs"]["filename_prefix"] += f"_{run.idx:04d}"
        if interrupt is not None:
            run.interrupt = dict(interrupt, landed=False)
            client.triggers[pid] = self._trigger(pid, interrupt)
        body = {"prompt": prompt, "client_id": client.client_id, "prompt_id": pid}
        if front:
            body["front"] = True
        async with self._session.post(f"{self.server.url}/prompt", data=json.dumps(body),
                                      headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
            answer = await resp.json(content_type=None)
            if resp.status != 200:
                run.status, run.error = "refused", json.dumps(answer)[:3000]
                client._event(pid).set()
        run._client = client
        return run

    def _trigger(self, pid: str, spec: dict):
        """A websocket hook that sends ``/interrupt`` for ``pid`` at the aimed moment (once)."""
        fired = {"done": False}
        loop = asyncio.get_running_loop()

        def fire():
            if not fired["done"]:
                fired["done"] = True
                loop.create_task(self._interrupt(pid, spec.get("delay", 0.0)))

        def hook(typ, data):
            aim = spec["aim"]
            if aim == "delay" and typ == "execution_start":
                fire()
            elif aim == "loading" and typ == "executing" and data.get("node") is not None:
                fire()  # the first node to execute: the loader, unless ComfyUI's cache already holds it
            elif aim in ("step", "switch") and typ == "progress" and int(data.get("value", -1)) >= spec["value"]:
                fire()

        return hook

    async def _interrupt(self, pid: str, delay: float):
        if delay:
            await asyncio.sleep(delay)
        async with self._session.post(f"{self.server.url}/interrupt", data=json.dumps({"prompt_id": pid}),
                                      headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
            await resp.read()

    async def wait(self, run: Run, timeout: float = 120.0) -> Run:
        client: WSClient = run._client
        ev = client._event(run.prompt_id)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            raise Failure(f"run #{run.idx} ({run.kind}) did not finish within {timeout:.0f} s\n{self.server.log_tail()}")
        run.seconds = time.monotonic() - run._t
        client.triggers.pop(run.prompt_id, None)
        if run.status == "refused":
            return run
        typ, data = client.final[run.prompt_id]
        run.status = {"execution_success": "success", "execution_error": "error", "execution_interrupted": "interrupted"}[typ]
        if run.status == "error":
            run.error = f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
        if run.status == "interrupted":
            if run.interrupt is None:
                self.collateral.append(f"run #{run.idx} ({run.kind}) was interrupted without being aimed at")
            else:
                prog = [int(d.get("value", 0)) for t, d in client.events.get(run.prompt_id, []) if t == "progress"]
                run.interrupt.update(landed=True, node_type=data.get("node_type"), node_id=data.get("node_id"),
                                     last_step=prog[-1] if prog else None)  # fmt: skip
        run.previews = client.previews.get(run.prompt_id, 0)
        run.progress = sum(1 for t, _ in client.events.get(run.prompt_id, []) if t == "progress")
        import psutil

        run.rss = psutil.Process(self.server.proc.pid).memory_info().rss
        self.rss.append((run.idx, run.rss))
        if run.status == "success":
            # the websocket message comes before the history entry is written: poll for it
            entry, t_hist = {}, time.monotonic()
            while not entry and time.monotonic() - t_hist < 30:
                entry = (await self._get(f"/history/{run.prompt_id}")).get(run.prompt_id) or {}
                if not entry:
                    await asyncio.sleep(0.02)
            outs = entry.get("outputs") or {}
            files = cs.output_files(self.server.base, {"outputs": {SAVE: outs.get(SAVE, {})}})
            if files:
                run.latent_sha = latent_sha(files[0])
                for f in files:
                    f.unlink(missing_ok=True)
            for node_out in outs.values():
                for d in node_out.get("dcm_soak_digest", []):
                    run.digests[d["label"]] = d["sha256"]
        return run

    async def _get(self, path: str):
        async with self._session.get(f"{self.server.url}{path}") as resp:
            return await resp.json(content_type=None)

    # ------------------------------------------------------------------ phases
    async def client_loop(self, client: WSClient, actions: list[tuple]):
        for act in actions:
            self.check_time()
            await self.others_may_run.wait()  # a swap cycle runs alone (see swap_cycle)
            if act[0] == "burst":
                runs = [await self.queue(client, kind, self.pool[i], expect_key=prompt_key(self.pool[i]))
                        for kind, i in act[1]]  # fmt: skip
                for run in runs:
                    await self.wait(run)
            elif act[0] == "interrupt":
                await self.interrupt_case(client, act[1], act[2])
            elif act[0] == "swap":
                await self.swap_cycle(client, act[1])
            elif act[0] == "bad":
                await self.bad_request(client, *act[1])

    async def interrupt_case(self, client: WSClient, i: int, aim: str):
        kind, prompt = self.pool_kinds[i], self.pool[i]
        plan = sampler_plan(prompt)
        spec = {"aim": aim, "steps": plan["steps"], "switch": plan["switch"]}
        if aim == "loading":
            spec["node"] = plan["loader"]
        elif aim == "step":
            spec["value"] = self.rng.randint(1, max(1, plan["steps"] - 1))
        elif aim == "switch":
            spec["value"] = max(1, plan["switch"])
        else:
            spec["delay"] = round(self.rng.uniform(0.0, 0.25), 3)
        run = await self.wait(await self.queue(client, kind, prompt, expect_key=prompt_key(prompt), interrupt=spec))
        if run.status == "interrupted":
            run.expect_key = None  # no output to compare
            # the next run of R (queued at the front) must be bit-identical, weights restored
            r = await self.wait(await self.queue(client, "R", self.R, expect_key=prompt_key(self.R), front=True))
            r.note = f"right after the interrupt of run #{run.idx}"

    async def swap_cycle(self, client: WSClient, cycle: int):
        """The swap file changes between two runs of the same prompt S, with nothing else queued in
        between (the other client waits): a re-download between two queued runs, as an artist does it."""
        self.others_may_run.clear()
        try:
            await self._idle()
            await self._swap_cycle(client, cycle)
        finally:
            self.others_may_run.set()

    async def _idle(self, timeout: float = 120.0):
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            q = await self._get("/queue")
            if not q.get("queue_running") and not q.get("queue_pending"):
                return
            await asyncio.sleep(0.05)
        raise Failure(f"the server queue did not drain within {timeout:.0f} s")

    async def _swap_cycle(self, client: WSClient, cycle: int):
        a, b = self.swap_bytes["a"], self.swap_bytes["b"]
        s = self.S
        key_a, key_b = prompt_key(self.S_a), prompt_key(self.S_b)
        path = self.swap_path

        async def run_s(expect_key=None, expect_error=None, note=""):
            run = await self.wait(await self.queue(client, "S", s, expect_key=expect_key, expect_error=expect_error))
            run.note = note
            return run

        def atomic(data: bytes):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

        def in_place(data: bytes):
            with open(path, "r+b") as fh:
                fh.write(data)
                fh.truncate()

        await run_s(key_a, note=f"cycle {cycle}: file = A")
        atomic(b)
        self.swaps.append({"cycle": cycle, "change": "replaced (atomic rename), same size"})
        await run_s(key_b, note=f"cycle {cycle}: replaced by B (rename)")
        in_place(a)
        self.swaps.append({"cycle": cycle, "change": "overwritten in place, same size"})
        await run_s(key_a, note=f"cycle {cycle}: overwritten in place by A")
        path.unlink()
        self.swaps.append({"cycle": cycle, "change": "deleted"})
        await run_s(expect_error=[SWAP_NAME], note=f"cycle {cycle}: deleted")
        r = await self.wait(await self.queue(client, "R", self.R, expect_key=prompt_key(self.R)))
        r.note = f"swap cycle {cycle}: the server keeps serving after the file was deleted"
        path.write_bytes(a[: len(a) // 2])
        self.swaps.append({"cycle": cycle, "change": "truncated to half"})
        await run_s(expect_error=[SWAP_NAME], note=f"cycle {cycle}: truncated")
        atomic(a)
        self.swaps.append({"cycle": cycle, "change": "restored"})
        await run_s(key_a, note=f"cycle {cycle}: restored A")

    async def bad_request(self, client: WSClient, name: str, body, fragments: list[str]):
        payload = body if isinstance(body, bytes) else json.dumps(dict(body, client_id=client.client_id)).encode()
        async with self._session.post(f"{self.server.url}/prompt", data=payload,
                                      headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
            text = await resp.text()
            status = resp.status
        try:  # compare on the decoded answer (the pack's messages hold non-ASCII characters)
            answer = json.loads(text)
            text = json.dumps(answer, ensure_ascii=False)
        except ValueError:
            answer = {}
        missing = [f for f in fragments if f.lower() not in text.lower()]
        ok = status == 400 and not missing
        entry = {"name": name, "status": status, "ok": ok, "missing": missing, "answer": text[:1500]}
        self.bad.append(entry)
        if ok:
            return
        why = f"HTTP {status}" + (f", answer lacks {missing}" if missing else "")
        pid = answer.get("prompt_id") if isinstance(answer, dict) else None
        if pid:  # accepted: it runs; wait for it so its outcome (and log traceback) is accounted for
            run = Run(idx=len(self.runs), client=client.name, kind="bad", key=name, prompt_id=pid,
                      expect_error=fragments, note=f"bad request '{name}' accepted")  # fmt: skip
            run._t, run._client = time.monotonic(), client
            self.runs.append(run)
            await self.wait(run)
            entry["ran"] = f"{run.status}: {run.error[:600]}"
            why += f"; it was queued and ended in {run.status}: {run.error[:400]}"
        self.failures["bad_requests"].append(f"bad request '{name}' was not refused by /prompt validation ({why})")

    # ------------------------------------------------------------------ plan
    def make_plan(self) -> tuple[list, list]:
        cfg, rng = self.cfg, self.rng
        kinds = [KINDS[i % len(KINDS)] for i in range(cfg.distinct)]
        rng.shuffle(kinds)
        self.pool_kinds = kinds
        self.pool = [make_variant(k, rng, cfg.pace_ms, default=(i < len(KINDS))) for i, k in enumerate(kinds)]
        for p in self.pool:
            self.prompts.setdefault(prompt_key(p), p)
        self.R = reference_prompt(cfg.pace_ms)
        self.S = reference_prompt(cfg.pace_ms, SWAP_NAME)
        self.S_a, self.S_b = reference_prompt(cfg.pace_ms, SWAP_A), reference_prompt(cfg.pace_ms, SWAP_B)
        for p in (self.R, self.S_a, self.S_b):
            self.prompts.setdefault(prompt_key(p), p)
        # interrupt aims cycle so each kind of moment is hit; extra attempts cover those that come too late
        aims = ["loading", "step", "switch", "delay"]
        n_int = cfg.interrupts + max(2, cfg.interrupts // 5)
        actions: list[tuple] = [("interrupt", rng.randrange(cfg.distinct), aims[i % 4]) for i in range(n_int)]
        plain = cfg.prompts - n_int  # the swap cycles' runs and the R checks come on top
        bursts, left = [], plain
        while left > 0:
            n = min(left, rng.choice([1, 1, 2, 3]))
            bursts.append(("burst", [(kinds[j], j) for j in (rng.randrange(cfg.distinct) for _ in range(n))]))
            left -= n
        actions += bursts
        rng.shuffle(actions)
        a_actions, b_actions = actions[0::2], actions[1::2]
        for c in range(cfg.swap_cycles):  # swaps: client A, spread over its queue
            a_actions.insert(min(len(a_actions), (c + 1) * len(a_actions) // (cfg.swap_cycles + 1)), ("swap", c))
        bad = bad_requests(cfg.pace_ms)
        for j, case in enumerate(bad):  # bad requests: client B, spread over its queue
            b_actions.insert(min(len(b_actions), (j + 1) * len(b_actions) // (len(bad) + 1)), ("bad", case))
        return a_actions, b_actions

    # ------------------------------------------------------------------ references
    def wanted_keys(self) -> list[str]:
        """Every prompt whose reference result the checks need (R first: it runs on a fresh process)."""
        keys = [prompt_key(self.R), prompt_key(self.S_a), prompt_key(self.S_b)] + [prompt_key(p) for p in self.pool]
        return list(dict.fromkeys(keys))

    async def references(self, needed: list[str], cache: dict) -> dict:
        """Run each needed prompt alone on the --cache-none reference server, one at a time."""
        client = WSClient("ref", self.ref_server.url, self._session)
        await client.connect()
        saved, self.server = self.server, self.ref_server  # queue / wait talk to the reference server now
        try:
            for k in needed:
                self.check_time()
                run = await self.wait(await self.queue(client, "ref", self.prompts[k]), timeout=180)
                self.runs.pop()  # reference runs are not soak runs
                if run.status != "refused":
                    self.rss.pop()
                if run.status != "success":
                    raise Failure(f"reference run of {k} failed: {run.status} {run.error}\n{self.ref_server.log_tail()}")
                cache[k] = {"latent_sha": run.latent_sha, "digests": run.digests}
        finally:
            self.server = saved
            await client.close()
        return cache

    # ------------------------------------------------------------------ main
    async def main(self, bases: tuple[Path, Path], home: Path) -> None:
        import aiohttp

        soak_base, ref_base = bases
        a_actions, b_actions = self.make_plan()
        cache_path = OUT / "refs.json"
        ctx = reference_context(soak_base)
        cache = _read_json(cache_path).get(ctx, {})
        needed = [k for k in self.wanted_keys() if k not in cache]
        self.server = cs.ComfyServer(soak_base, home / "soak", extra_args=SERVER_FLAGS)
        self.ref_server = cs.ComfyServer(ref_base, home / "ref", extra_args=(*SERVER_FLAGS, "--cache-none"))
        self.refs_cached = len(self.wanted_keys()) - len(needed)
        try:
            # both boot at once (mostly imports); no reference server when every reference is cached
            starts = [asyncio.to_thread(self.server.start, 240)]
            if needed:
                starts.append(asyncio.to_thread(self.ref_server.start, 240))
            await asyncio.gather(*starts)
            self.boot_s = self.elapsed()
            self.log(f"soak: server(s) ready after {self.boot_s:.1f} s; {len(needed)} reference run(s) to make")
            async with aiohttp.ClientSession(trust_env=False) as session:
                self._session = session
                if needed:
                    cache = await self.references(needed, cache)
                    OUT.mkdir(parents=True, exist_ok=True)
                    cache_path.write_text(json.dumps({ctx: cache}, indent=0))  # only the current context is kept
                    self.ref_server.stop()
                self.refs = cache
                self.ref_s = self.elapsed() - self.boot_s
                ca, cb = WSClient("A", self.server.url, session), WSClient("B", self.server.url, session)
                await ca.connect()
                await cb.connect()
                self.clients = (ca, cb)
                self.others_may_run = asyncio.Event()
                self.others_may_run.set()
                t_soak = self.elapsed()
                await asyncio.gather(self.client_loop(ca, a_actions), self.client_loop(cb, b_actions))
                # bad requests must not have broken anything: one more R
                await self.wait(await self.queue(ca, "R", self.R, expect_key=prompt_key(self.R)))
                self.soak_s = self.elapsed() - t_soak
                self.log(f"soak: {len(self.runs)} runs in {self.soak_s:.1f} s")
                await ca.close()
                await cb.close()
        finally:
            self.server.stop()
            self.ref_server.stop()
        self.duration_s = self.elapsed()

    # ------------------------------------------------------------------ checks + figures
    def evaluate(self) -> dict:
        cfg = self.cfg
        compared = identical = 0
        ca, cb = self.clients
        own = {c.name: {r.prompt_id for r in self.runs if r.client == c.name} for c in (ca, cb)}
        for run in self.runs:
            label = f"run #{run.idx} ({run.kind}, client {run.client}{', ' + run.note if run.note else ''})"
            cat = "swaps" if run.kind == "S" or "swap" in run.note else "interrupts" if "interrupt" in run.note else "queue"
            if run.kind == "bad":
                continue  # a bad request that was accepted: reported by bad_request()
            if run.expect_error is not None:
                text = run.error
                if run.status not in ("error", "refused") or any(f not in text for f in run.expect_error):
                    self.failures[cat].append(f"{label}: expected an error naming {run.expect_error}, got {run.status}: {text[:600]}")
                continue
            if run.status == "interrupted" and run.interrupt is not None:
                continue
            if run.status != "success":
                if run.status == "interrupted":
                    continue  # collateral, reported separately
                self.failures[cat].append(f"{label}: {run.status}: {run.error[:1500]}")
                continue
            if run.expect_key is None:
                continue
            ref = self.refs.get(run.expect_key)
            compared += 1
            if ref is None:
                self.failures[cat].append(f"{label}: no reference for {run.expect_key}")
            elif run.latent_sha != ref["latent_sha"] or run.digests != ref["digests"]:
                what = "output latent" if run.latent_sha != ref["latent_sha"] else "expert weight digests"
                self.failures[cat].append(
                    f"{label}: {what} differ from the same prompt alone on a fresh server "
                    f"(latent {run.latent_sha} vs {ref['latent_sha']}, digests {run.digests} vs {ref['digests']})"
                )
            else:
                identical += 1
        # the shared base weights are the semantic expert's (checked on the fresh server's R)
        ref_r = self.refs.get(prompt_key(self.R)) or {}
        d = ref_r.get("digests", {})
        if d.get("semantic") != d.get("semantic file") or not d.get("semantic"):
            self.failures["interrupts"].append(
                f"the DCM loader's semantic model does not hold the semantic expert's weights (digests {d})")
        # swaps must change the result (else the stale-file check could not fail)
        ra, rb = self.refs.get(prompt_key(self.S_a)), self.refs.get(prompt_key(self.S_b))
        if ra and rb and ra["latent_sha"] == rb["latent_sha"]:
            self.failures["swaps"].append("swap checkpoints A and B give the same output: the stale-file check cannot fail")
        # clients: own messages and previews only
        for c in (ca, cb):
            other = own["B" if c.name == "A" else "A"]
            leaked = sorted(set(c.events) & other)
            leaked_prev = sorted(set(c.previews) & other)
            if leaked or leaked_prev:
                self.failures["clients"].append(f"client {c.name} received messages / previews of the other client's prompts "
                                     f"{(leaked + leaked_prev)[:5]}")  # fmt: skip
            if c.unattributed_previews:
                self.failures["clients"].append(f"client {c.name} got {c.unattributed_previews} previews without metadata")
        for run in self.runs:
            if run.status == "success" and run.progress and run.previews == 0:
                self.failures["clients"].append(f"run #{run.idx} ({run.kind}, client {run.client}) finished with no preview")
                break
        # interrupts
        landed = [r for r in self.runs if r.interrupt and r.interrupt["landed"]]
        if len(landed) < cfg.interrupts:
            self.failures["interrupts"].append(f"only {len(landed)} interrupts landed (need {cfg.interrupts})")
        # memory
        mem = rss_figures(self.rss, cfg.warmup)
        if mem["growth_pct"] is None:
            self.failures["memory"].append(f"too few runs ({len(self.rss)}) for the RSS figure after {cfg.warmup} warm-up runs")
        elif mem["growth_pct"] > cfg.rss_limit_pct:
            self.failures["memory"].append(f"server RSS grew {mem['growth_pct']:.1f} % after warm-up (limit {cfg.rss_limit_pct} %)")
        # the server log
        tb = scan_tracebacks(self.server.log_path)
        n_expected = sum(1 for r in self.runs if r.expect_error is not None and r.status == "error")
        for t in tb["pack"]:
            if not re.search(r"\bDCM\w*Error\b", t["last"]):
                self.failures["server_log"].append(f"traceback through pack code that does not end in a DCM error: {t['last']}\n{t['text'][-1500:]}")
        if len(tb["pack"]) > n_expected:
            self.failures["server_log"].append(f"{len(tb['pack'])} tracebacks through pack code in the server log, "
                                 f"but only {n_expected} runs were expected to fail")  # fmt: skip
        landed_at = {}
        for r in landed:
            landed_at[where_landed(r.interrupt)] = landed_at.get(where_landed(r.interrupt), 0) + 1
        finished = [r for r in self.runs if r.status in ("success", "error", "interrupted")]
        return {
            "config": asdict(cfg),
            "runs": len(finished),
            "queue_prompts": sum(1 for r in self.runs if r.kind in KINDS),
            "reference_checks": sum(1 for r in self.runs if r.kind == "R"),
            "interrupts_sent": sum(1 for r in self.runs if r.interrupt),
            "interrupts_landed": len(landed),
            "interrupts_where": landed_at,
            "collateral_interrupts": self.collateral,
            "swaps": len(self.swaps),
            "swap_events": self.swaps,
            "clients": 2,
            "runs_per_client": {c.name: len(own[c.name]) for c in (ca, cb)},
            "previews_per_client": {c.name: sum(c.previews.values()) for c in (ca, cb)},
            "compared_outputs": compared,
            "bit_identical_outputs": identical,
            "distinct_prompts": len(self.prompts),
            "bad_requests": len(self.bad),
            "bad_requests_refused_ok": sum(1 for b in self.bad if b["ok"]),
            "bad_request_answers": self.bad,
            "tracebacks": {"pack": len(tb["pack"]), "other": len(tb["other"]), "other_last": [t["last"] for t in tb["other"]][:10]},
            "rss": mem,
            "failures": self.failures,
            "failure_count": sum(len(v) for v in self.failures.values()),
            "server_boot_s": round(self.boot_s, 1),
            "soak_s": round(self.soak_s, 1),
            "references_s": round(self.ref_s, 1),
            "references_cached": self.refs_cached,
            "duration_s": round(self.duration_s, 1),
            "run_table": [
                {k: v for k, v in asdict(r).items() if k not in ("expect_error",)} for r in self.runs
            ],
        }


def where_landed(info: dict) -> str:
    """Where an interrupt stopped the run: before sampling, between two steps of one expert, or at the
    expert switch (the step callback raises right after reporting step k, so k = the semantic steps)."""
    step = info.get("last_step")
    if info.get("node_type") not in ("DCMDualExpertSampler", "SamplerCustomAdvanced"):
        return f"before sampling ({info.get('node_type')})"
    if not step:
        return "in the sampler, before its first step"
    if step == info.get("switch"):
        return "at the expert switch"
    return "between two sampler steps"


def latent_sha(path: Path) -> str:
    """SHA-256 of the saved latent tensor (dtype, shape and raw bytes; file metadata ignored)."""
    import torch
    from safetensors.torch import load_file

    t = load_file(str(path))["latent_tensor"]
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_context(base: Path) -> str:
    """Reference results stay valid while the pack, the test nodes, the models and ComfyUI are unchanged."""
    h = hashlib.sha256()
    for root in ("dcm_core", "nodes", "tests/soak/soak_nodes", "tests/comfy/testing_nodes"):
        for p in sorted((ROOT / root).rglob("*.py")):
            h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    h.update((ROOT / "__init__.py").read_bytes())
    for p in sorted((base / "models").rglob("*")):
        if p.is_file() and p.name != SWAP_NAME:
            h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    try:
        commit = subprocess.run(["git", "-C", str(cs.comfyui_path()), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()  # fmt: skip
    except Exception:  # noqa: BLE001
        commit = ""
    h.update(commit.encode() + b"\0" + " ".join(SERVER_FLAGS).encode())
    return h.hexdigest()[:24]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def rss_figures(samples: list[tuple[int, int]], warmup: int) -> dict:
    """Growth after warm-up: median of the last 10 samples against the median of the 10 after warm-up."""
    values = [v for _, v in samples]
    out = {"samples": len(values), "warmup_runs": warmup, "growth_pct": None, "max_growth_pct": None}
    if not values:
        return out
    out.update(first_mb=round(values[0] / 2**20, 1), peak_mb=round(max(values) / 2**20, 1),
               last_mb=round(values[-1] / 2**20, 1))  # fmt: skip
    rest = values[warmup:]
    if len(rest) < 10:
        return out
    base = sorted(rest[:10])[5]
    end = sorted(rest[-10:])[5]
    out.update(baseline_mb=round(base / 2**20, 1), end_mb=round(end / 2**20, 1),
               growth_pct=round(100.0 * (end - base) / base, 2),
               max_growth_pct=round(100.0 * (max(rest) - base) / base, 2))  # fmt: skip
    return out


_TB_FILE = re.compile(r'^\s*File "([^"]+)", line \d+')


def scan_tracebacks(log_path: Path) -> dict:
    """Traceback blocks in the server log, split by whether a frame is in the pack's code."""
    lines = Path(log_path).read_text(errors="replace").splitlines()
    pack_markers = (f"/custom_nodes/{cs.PACK_DIR_NAME}/", str(ROOT) + "/")
    found = {"pack": [], "other": []}
    i = 0
    while i < len(lines):
        if lines[i].startswith("Traceback (most recent call last)"):
            j = i + 1
            frames = []
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("\t")):
                m = _TB_FILE.match(lines[j])
                if m:
                    frames.append(m.group(1))
                j += 1
            last = lines[j] if j < len(lines) else ""
            block = {"last": last, "text": "\n".join(lines[i : j + 1])}
            in_pack = any(any(mk in f for mk in pack_markers) and "/tests/" not in f for f in frames)
            found["pack" if in_pack else "other"].append(block)
            i = j
        i += 1
    return found


def plot_rss(samples: list[tuple[int, int]], warmup: int, path: Path, title: str) -> None:
    """A small line plot of server RSS per finished run (Pillow; no matplotlib in the venv)."""
    from PIL import Image, ImageDraw

    w, h, ml, mr, mt, mb = 720, 300, 70, 20, 30, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    if not samples:
        img.save(path)
        return
    ys = [v / 2**20 for _, v in samples]
    lo, hi = min(ys), max(ys)
    pad = max(1.0, 0.1 * (hi - lo))
    lo, hi = lo - pad, hi + pad
    n = len(ys)

    def xy(i, v):
        x = ml + (w - ml - mr) * (i / max(1, n - 1))
        y = mt + (h - mt - mb) * (1 - (v - lo) / (hi - lo))
        return x, y

    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        _, y = xy(0, v)
        d.line([ml - 4, y, ml, y], fill="black")
        d.text((4, y - 6), f"{v:.0f} MB", fill="black")
    if warmup < n:
        x, _ = xy(warmup, lo)
        d.line([x, mt, x, h - mb], fill=(200, 120, 0))
        d.text((x + 3, mt + 2), "end of warm-up", fill=(200, 120, 0))
    d.line([xy(i, v) for i, v in enumerate(ys)], fill=(20, 60, 200), width=2)
    d.text((ml, 8), title, fill="black")
    d.text((ml, h - mb + 8), f"finished runs (1 … {n})", fill="black")
    img.save(path)


def run_soak(cfg: SoakConfig, work: Path, log=print) -> dict:
    """Run the whole soak; returns the figures (also written to tests/_output/soak/soak-<short|full>.json)."""
    OUT.mkdir(parents=True, exist_ok=True)
    soak = Soak(cfg, work, log)
    bases = soak.build_bases()
    for b in bases:  # one after the other: the second links the first's cached files
        cs.ModelBuild(b / "models").start().finish(timeout=300)
    soak.swap_files([bases[0] / "models", bases[1] / "models"])
    try:
        asyncio.run(asyncio.wait_for(soak.main(bases, work / "home"), cfg.time_limit_s + 60))
    finally:
        for name, srv in (("server", soak.server), ("reference_server", soak.ref_server)):
            if srv is not None:
                srv.stop()
                if srv.log_path.is_file():
                    shutil.copyfile(srv.log_path, OUT / f"{name}.log")
    figures = soak.evaluate()
    figures["form"] = "full" if cfg.prompts >= 200 else "short"
    plot_rss(soak.rss, cfg.warmup, OUT / f"rss-{figures['form']}.png",
             f"ComfyUI server RSS per finished run ({figures['form']} soak, growth after warm-up "
             f"{figures['rss']['growth_pct']} %)")  # fmt: skip
    (OUT / f"soak-{figures['form']}.json").write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    import tempfile

    full = "--full" in sys.argv
    with tempfile.TemporaryDirectory(prefix="dcm_soak_") as tmp:
        res = run_soak(SoakConfig.full() if full else SoakConfig.short(), Path(tmp))
    print(json.dumps({k: v for k, v in res.items() if k not in ("run_table", "bad_request_answers")}, indent=1))
    sys.exit(1 if res["failure_count"] else 0)
