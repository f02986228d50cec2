"""``python -m dcm_core``: help, convert, inspect, exit codes, no partial outputs, the subcommand registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcm_core import cli, tiny
from dcm_core.errors import DCMFormatError

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DCM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "dcm_core", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    m = tiny.make_official_model("wan", tiny.wan_config(num_layers=1), rank=4, alpha=8.0)
    return tiny.save_official_checkpoint(m, tmp_path_factory.mktemp("cli") / "DCM_WAN" / "transformer" / "diffusion_pytorch_model.safetensors")


def test_help_is_fast_and_lists_commands():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert "convert" in r.stdout and "inspect" in r.stdout
    code = "import sys; from dcm_core.cli import build_parser; build_parser(['--help']); print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert out.stdout.strip() == "False", "top-level --help must not import torch"


@pytest.mark.parametrize("cmd,words", [("convert", ["--out-dir", "--dtype", "fp8_e4m3fn", "--name"]), ("inspect", ["FILE"])])
def test_subcommand_help(cmd, words, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main([cmd, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out


def test_convert_subprocess_writes_both_files_with_progress(official, tmp_path):
    out = tmp_path / "out"
    r = _run("convert", official, "--out-dir", out, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["DCM_WAN_detail_expert.safetensors", "DCM_WAN_semantic.safetensors"]  # name from the release folder
    assert "diffusion_models" in r.stdout and "loras" in r.stdout
    assert "convert DCM_WAN" in r.stderr  # tqdm bar


def test_inspect_prints_everything(official, tmp_path, capsys):
    assert cli.main(["convert", str(official), "--out-dir", str(tmp_path), "--name", "n", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(official), str(tmp_path / "n_detail_expert.safetensors")]) == 0
    out = capsys.readouterr().out
    for w in ("official_dcm", "dcm_detail_expert", "Wan2.x", "lora rank:  4", "lora alpha: 256", "dcm-recipe-default",
              "boundary:   978", "wan2.1-t2v-6step", "tensors:", "dtype:      fp32", "dtype:      bf16"):  # fmt: skip
        assert w in out, w


def test_bad_input_exit_code_no_traceback(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = _run("inspect", bad)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and str(bad) in r.stderr
    assert "Traceback" not in r.stderr


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_convert_refuses_wrong_kinds_without_output(official, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    pk = tmp_path / "model.ckpt"
    pk.write_bytes(b"\x80\x02}q\x00.")
    assert cli.main(["convert", str(pk), "--out-dir", str(out)]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert cli.main(["convert", str(official), "--out-dir", str(out), "--name", "../evil"]) == 2
    assert "--name" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "missing.safetensors"), "--out-dir", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["convert", str(official), "--out-dir", str(out), "--dtype", "int4"])
    assert _listing(out) == []


def test_failure_mid_conversion_leaves_nothing(official, tmp_path, monkeypatch, capsys):
    import dcm_core.convert as conv

    real = conv.produce_detail
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise DCMFormatError("simulated read error in the middle of the detail expert")
        return real(*a, **k)

    monkeypatch.setattr(conv, "produce_detail", flaky)
    out = tmp_path / "out"
    assert cli.main(["convert", str(official), "--out-dir", str(out), "--no-progress"]) == 2
    assert "simulated read error" in capsys.readouterr().err
    assert _listing(out) == []  # neither file, no hidden partials


def test_register_command_extends_the_cli(capsys):
    seen = {}

    def add(p):
        p.add_argument("--n", type=int, default=1)

    def run(args):
        seen["n"] = args.n
        print("hello from demo")
        return 3

    cli.register_command("unit-test-cmd", "a test command", add, run)
    try:
        assert cli.main(["unit-test-cmd", "--n", "7"]) == 3
        assert seen == {"n": 7} and "hello from demo" in capsys.readouterr().out
        assert cli.main([]) == 0
        assert "unit-test-cmd" in capsys.readouterr().out
    finally:
        cli._REGISTRY.pop("unit-test-cmd", None)
