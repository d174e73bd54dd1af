"""diagnose_report / recommended_device: content of the report, and robustness when torch is missing."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAM3DSegmentLib.cli import diagnose as D
from SAM3DSegmentLib import weights as W

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAM3D_WEIGHTS_BASE_URL", raising=False)


def _fake_torch(cuda: bool = True, mps: bool = False, broken_cuda: bool = False):
    """A stand-in torch module with two CUDA devices (or none)."""
    GiB = 1024 ** 3

    def is_available():
        if broken_cuda:
            raise RuntimeError("driver exploded")
        return cuda

    props = [types.SimpleNamespace(name="NVIDIA Fake A100", total_memory=80 * GiB, major=8, minor=0),
             types.SimpleNamespace(name="NVIDIA Fake T4", total_memory=16 * GiB, major=7, minor=5)]
    cuda_mod = types.SimpleNamespace(
        is_available=is_available, device_count=lambda: 2,
        get_device_properties=lambda i: props[i],
        mem_get_info=lambda i: ((30 * GiB, 80 * GiB), (3 * GiB, 16 * GiB))[i])
    backends = types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: mps),
                                     cudnn=types.SimpleNamespace(version=lambda: 90100))
    return types.SimpleNamespace(__version__="9.9.9-fake", __file__="/fake/torch/__init__.py", cuda=cuda_mod,
                                 backends=backends, version=types.SimpleNamespace(cuda="12.4"),
                                 get_num_threads=lambda: 7, get_num_interop_threads=lambda: 3)


def test_report_sections_with_real_torch(tmp_path):
    import torch  # a dev dependency; running without torch is tested below
    text = D.diagnose_report({"model": "sam-med3d-turbo", "backend": "LocalBackend(cpu)"})
    for header in ("== System ==", "== Libraries ==", "== PyTorch ==", "== Model cache ==", "== 3D Slicer ==",
                   "== Extra =="):
        assert header in text
    assert f"Python: {sys.version.split()[0]}" in text
    assert f"numpy: {np.__version__}" in text
    assert f"SimpleITK: {sitk.Version_VersionString()}" in text
    assert f"torch: {torch.__version__}" in text
    assert f"torch CPU threads: {torch.get_num_threads()} intra-op" in text
    assert f"CUDA available: {'yes' if torch.cuda.is_available() else 'no'}" in text
    assert "MPS available:" in text
    assert f"Cache directory: {tmp_path / 'home'} (from $SAM3D_HOME" in text
    assert "sam-med3d-turbo: sam_med3d_turbo.pth, vit_b_ori; not downloaded" in text
    assert "Not running inside 3D Slicer" in text  # the venv's 'slicer' package has no application
    assert "model: sam-med3d-turbo" in text and "backend: LocalBackend(cpu)" in text
    assert text.endswith("\n")


def test_recommended_device_matches_torch():
    import torch
    choice = D.recommended_device()
    if torch.cuda.is_available():
        assert choice == "cuda" and choice.warning is None
    elif D._mps_available(torch):
        assert choice == "mps" and choice.warning is None
    else:
        assert choice == "cpu" and "CPU" in choice.warning
    assert torch.device(choice).type == str(choice)  # usable wherever a device string is


def test_fake_cuda_devices_are_listed(monkeypatch):
    monkeypatch.setattr(D, "_import_torch", lambda: (_fake_torch(cuda=True), None))
    text = D.diagnose_report()
    assert "torch: 9.9.9-fake" in text
    assert "CUDA available: yes (torch built with CUDA 12.4)" in text
    assert "cuda:0: NVIDIA Fake A100, compute capability 8.0, memory 30.00 GiB free of 80.00 GiB" in text
    assert "cuda:1: NVIDIA Fake T4, compute capability 7.5, memory 3.00 GiB free of 16.00 GiB" in text
    assert "torch CPU threads: 7 intra-op, 3 inter-op" in text
    assert "Recommended device: cuda" in text and "Warning:" not in text
    assert D.recommended_device() == "cuda" and D.recommended_device().warning is None


def test_mps_and_cpu_choices(monkeypatch):
    monkeypatch.setattr(D, "_import_torch", lambda: (_fake_torch(cuda=False, mps=True), None))
    assert D.recommended_device() == "mps"
    assert "MPS available: yes" in D.diagnose_report()
    monkeypatch.setattr(D, "_import_torch", lambda: (_fake_torch(cuda=False, mps=False), None))
    choice = D.recommended_device()
    assert choice == "cpu" and choice.warning == D.CPU_WARNING
    assert "Warning: No CUDA or Apple MPS GPU" in D.diagnose_report()


def test_broken_cuda_does_not_break_the_report(monkeypatch):
    monkeypatch.setattr(D, "_import_torch", lambda: (_fake_torch(broken_cuda=True), None))
    text = D.diagnose_report()
    assert "CUDA check failed: RuntimeError: driver exploded" in text
    assert "CUDA available: no" in text and "== 3D Slicer ==" in text
    assert D.recommended_device() == "cpu"


def test_torch_blocked_in_process(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" now raises ImportError
    text = D.diagnose_report()
    assert "torch: not importable (ModuleNotFoundError" in text
    assert "CUDA available: no (torch missing)" in text
    choice = D.recommended_device()
    assert choice == "cpu" and "torch cannot be imported" in choice.warning
    assert "== Model cache ==" in text


def test_torch_import_failing_in_a_fresh_interpreter():
    """Without torch at all (never imported in that process), the report still comes out."""
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def fake(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'):\n"
            "        raise ImportError('simulated: no torch here')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = fake\n"
            "sys.modules['torch'] = None\n"
            "from SAM3DSegmentLib.cli.diagnose import diagnose_report, recommended_device\n"
            "print(diagnose_report({'probe': 'ok'}))\n"
            "print('DEVICE', recommended_device())\n"
            "print('TORCH_LOADED', 'torch' in sys.modules and sys.modules['torch'] is not None)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "torch: not importable" in out
    assert "DEVICE cpu" in out and "Warning: torch cannot be imported" in out
    assert "probe: ok" in out and "== Model cache ==" in out
    assert "TORCH_LOADED False" in out


def test_cache_files_and_checksum_state(tmp_path):
    folder = W.checkpoint_dir()
    folder.mkdir(parents=True)
    ckpt = folder / "sam_med3d.pth"
    from _checkpoint_bytes import checkpoint_bytes  # a SAM-Med3D-like torch.save file (no published sha256
    content = checkpoint_bytes()  # exists for sam-med3d, so its content must look like a checkpoint)
    n = len(content)
    ckpt.write_bytes(content)
    (folder / "sam_med3d_turbo.pth.part").write_bytes(b"y" * 10)
    (folder / "custom.pt").write_bytes(b"z" * 5)
    text = D.diagnose_report()
    assert f"sam_med3d.pth [sam-med3d]: {n / 1024:.1f} KiB ({n} bytes); not verified yet" in text
    assert "sam_med3d_turbo.pth.part: 10 B (10 bytes); partial download" in text
    assert "custom.pt: 5 B (5 bytes)" in text
    text = D.diagnose_report(verify_checksums=True)
    digest = hashlib.sha256(content).hexdigest()
    assert f"sam_med3d.pth [sam-med3d]: {n / 1024:.1f} KiB ({n} bytes); sha256 checked now: OK ({digest[:16]}" in text
    # Afterwards the recorded state is shown without hashing.
    assert "sha256 recorded at first use" in D.diagnose_report()
    mid = n // 2  # one byte of tensor data changed: still a readable checkpoint, another sha256
    ckpt.write_bytes(content[:mid] + bytes([content[mid] ^ 1]) + content[mid + 1:])
    assert "MISMATCH" in D.diagnose_report(verify_checksums=True)


def test_slicer_version_when_inside_slicer(monkeypatch):
    app = types.SimpleNamespace(applicationVersion="5.8.1", repositoryRevision="33241",
                                mainWindow=lambda: object())
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=app))
    text = D.diagnose_report()
    assert "Slicer version: 5.8.1" in text and "Revision: 33241" in text and "Main window: yes" in text
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace())  # no .app (e.g. slicer-core)
    assert "Not running inside 3D Slicer" in D.diagnose_report()
    monkeypatch.setitem(sys.modules, "slicer", None)
    assert "no slicer module loaded in this process" in D.diagnose_report()
