"""Hostile and broken inputs to the weights cache, the downloader and the checkpoint loader (issue 9 items
3, 6, 8, 11; issue 8 item 11). Network tests use servers on 127.0.0.1 started here, bounded in time."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from SAM3DSegmentLib import weights as W
from SAM3DSegmentLib.cli.download import main as download_main
from SAM3DSegmentLib.models.checkpoint_file import CheckpointError, inspect_checkpoint

from _checkpoint_bytes import checkpoint_bytes  # noqa: E402  (Testing/ is on sys.path under pytest)
from _loopback_http import LoopbackServer as Server, isolated_download_env  # noqa: E402,F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
HTML = b"<!DOCTYPE html><html><head><title>Hotel Wi-Fi</title></head><body>Log in to continue</body></html>"


def _folder(tmp_path) -> Path:
    return tmp_path / "home" / "checkpoints"


def _left_in(folder: Path):
    """Files in ``folder`` besides the empty ``<file>.lock`` that filelock may leave after release (its presence
    means nothing; a lock file holding anything would be listed)."""
    return sorted(p.name for p in folder.iterdir()
                  if not (p.name.endswith(".lock") and p.is_file() and p.stat().st_size == 0))


# ------------------------------------------------------------------ item 3: captive portal, repair, names

def test_captive_portal_page_is_never_pinned(tmp_path, monkeypatch):
    with Server({"sam_med3d.pth": HTML}) as srv:
        monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", srv.base)
        with pytest.raises(W.WeightsError) as info:
            W.resolve_checkpoint("sam-med3d", progress=None)
    msg = str(info.value)
    assert "not a usable checkpoint" in msg and "HTML page" in msg and "captive portal" in msg
    assert _left_in(_folder(tmp_path)) == []  # no file, no pinned record, no .part


def test_non_sam_checkpoint_is_not_pinned_either(tmp_path, monkeypatch):
    other = checkpoint_bytes(keys=("encoder.layer.0.weight", "head.weight"))
    with Server({"sam_med3d.pth": other}) as srv:
        monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", srv.base)
        with pytest.raises(W.WeightsError, match="lack the SAM-Med3D parts"):
            W.resolve_checkpoint("sam-med3d", progress=None)
    assert _left_in(_folder(tmp_path)) == []


def _pin_like_an_old_version(tmp_path, content: bytes) -> Path:
    """What earlier versions left behind: the file and a trust-on-first-use record of its sha256."""
    target = W.cached_path("sam-med3d")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    st = target.stat()
    W.sidecar_path(target).write_text(json.dumps({
        "file": target.name, "name": "sam-med3d", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "sha256": hashlib.sha256(content).hexdigest(), "verified": "trust-on-first-use", "url": None,
        "recorded": "2025-01-01T00:00:00Z"}))
    return target


def test_pinned_portal_page_is_reported_listed_and_repaired(tmp_path, monkeypatch, capsys):
    target = _pin_like_an_old_version(tmp_path, HTML)
    with pytest.raises(W.WeightsError) as info:
        W.resolve_checkpoint("sam-med3d", download=False)
    assert "sam3d download --repair sam-med3d" in str(info.value) and "HTML page" in str(info.value)
    assert target.read_bytes() == HTML  # reported, not silently deleted

    assert download_main(["--list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("sam-med3d "))
    assert " corrupt " in row and "present" not in out
    assert "fix: sam3d download --repair sam-med3d" in out

    good = checkpoint_bytes(numel=1000, seed=7)
    with Server({"sam_med3d.pth": good}) as srv:
        monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", srv.base)
        assert download_main(["--repair", "sam-med3d"]) == 0
        out = capsys.readouterr().out
        assert f"deleted {target}" in out
        assert target.read_bytes() == good
        record = json.loads(W.sidecar_path(target).read_text(encoding="utf-8"))
        assert record["sha256"] == hashlib.sha256(good).hexdigest()
        # A good copy is kept: --repair checks it and fetches nothing.
        assert download_main(["--repair", "sam-med3d"]) == 0
        assert "nothing to repair" in capsys.readouterr().out
        assert len(srv.requests) == 1
    assert download_main(["--list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sam-med3d "))
    assert " unverified " in row


def test_list_states_verified_corrupt_partial(tmp_path, monkeypatch, capsys):
    data = checkpoint_bytes(numel=50, seed=8)
    entry = W.register_weights(W.ModelWeights(
        name="test-published", filename="test_published.pth", url="http://127.0.0.1:9/x", size=None,
        sha256=hashlib.sha256(data).hexdigest(), architecture="tiny", license="test", description="test"))
    try:
        folder = _folder(tmp_path)
        folder.mkdir(parents=True)
        (folder / entry.filename).write_bytes(data)
        (folder / "sam_med3d_turbo.pth").write_bytes(data)  # not the published turbo file
        (folder / "sam_med3d.pth.part").write_bytes(b"x" * 3000)
        assert download_main(["--list"]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]
                if line and not line.startswith(" ")}
        assert " verified " in rows["test-published"]
        assert " corrupt " in rows["sam-med3d-turbo"]
        assert " partial " in rows["sam-med3d"]
        assert " absent " not in rows["sam-med3d"]
    finally:
        W.REGISTRY.pop(entry.name)


def test_file_in_current_folder_named_like_a_model_does_not_bypass_the_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sam-med3d").write_bytes(HTML)
    with pytest.raises(W.WeightsError, match="not in the cache"):
        W.resolve_checkpoint("sam-med3d", download=False)
    # Meaning the local file takes a path: ./NAME or a Path.
    assert W.resolve_checkpoint("./sam-med3d") == Path("./sam-med3d")
    assert W.resolve_checkpoint(Path("sam-med3d")) == Path("sam-med3d")

    from SAM3DSegmentLib.inference.backends import BackendError, load_backend

    monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(BackendError, match="cannot find the model"):
        load_backend("sam-med3d", None)
    with pytest.raises(BackendError, match="Unknown model name"):
        load_backend("./sam-med3d", None)  # --model takes names only; files go to --checkpoint


@pytest.mark.parametrize("filename", ["../../x.pth", "/etc/passwd", "sub/x.pth", "..", "", ".hidden",
                                      "a\\b.pth"])
def test_registry_file_name_escaping_the_cache_is_refused(filename):
    with pytest.raises(W.WeightsError, match="not a plain file name"):
        W.ModelWeights(name="evil", filename=filename, url="http://127.0.0.1:9/x", size=None, sha256=None,
                       architecture="vit_b_ori", license="x", description="x")


def test_registry_entry_edited_in_place_is_refused_too(monkeypatch):
    entry = W.register_weights(W.ModelWeights(
        name="test-evil", filename="ok.pth", url="http://127.0.0.1:9/x", size=None, sha256=None,
        architecture="vit_b_ori", license="x", description="x"))
    try:
        object.__setattr__(entry, "filename", "../../escaped.pth")
        with pytest.raises(W.WeightsError, match="not a plain file name"):
            W.resolve_checkpoint("test-evil", download=False)
        with pytest.raises(W.WeightsError, match="not a plain file name"):
            W.cached_path("test-evil")
    finally:
        W.REGISTRY.pop("test-evil")


# ------------------------------------------------------------------ item 6: small files, large claims

def test_storage_declared_larger_than_the_file_is_refused(tmp_path):
    path = tmp_path / "claims.pth"
    path.write_bytes(checkpoint_bytes(numel=4, declared_numel=2_000_000_000))  # claims 7.5 GiB
    with pytest.raises(CheckpointError, match=r"declares 7\.5 GiB .* but stores 16 B"):
        inspect_checkpoint(path)
    assert W.payload_problem(path) and "Refusing to allocate" in W.payload_problem(path)


def test_tensor_view_larger_than_its_storage_is_refused(tmp_path):
    path = tmp_path / "view.pth"
    path.write_bytes(checkpoint_bytes(numel=4, shape=(100_000, 100_000), stride=(0, 0)))
    with pytest.raises(CheckpointError, match="claims more elements than its storage"):
        inspect_checkpoint(path)


def test_zip_bomb_is_refused_from_its_directory(tmp_path):
    path = tmp_path / "bomb.pth"
    path.write_bytes(checkpoint_bytes(numel=4))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("archive/data/filler", "w") as f:
        block = bytes(1 << 20)
        for _ in range(64):  # 64 MiB of zeros: about 64 kB on disk
            f.write(block)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="zip bomb"):
        inspect_checkpoint(path)


def test_pickle_that_is_not_a_torch_file_is_refused(tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"model_state_dict": {"image_encoder.x": [1.0]}}, protocol=2))
    with pytest.raises(CheckpointError, match="not a torch.save file"):
        inspect_checkpoint(path)


@pytest.mark.parametrize("kind", ["char-device", "fifo"])
def test_device_or_fifo_is_not_called_a_directory(tmp_path, kind):
    if kind == "char-device":
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero on this system")
    else:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        path = tmp_path / "pipe.pth"
        os.mkfifo(path)
    with pytest.raises(W.WeightsError) as info:
        W.resolve_checkpoint(str(path))
    assert "not a regular file" in str(info.value) and "directory" not in str(info.value)


# ------------------------------------------------------------------ item 8: trickle, deadline

def test_trickling_body_is_stopped_by_the_stall_detector(tmp_path):
    data = checkpoint_bytes(numel=50_000)
    dest = tmp_path / "m.pth"
    with Server({"m.pth": data}, rate=20) as srv:  # 20 B/s, with --timeout 5 never fires
        t0 = time.monotonic()
        with pytest.raises(W.WeightsError) as info:
            W.download(srv.base + "/m.pth", dest, timeout=5, min_rate=1000, stall_window=1.0)
        elapsed = time.monotonic() - t0
    assert elapsed < 4, elapsed
    msg = str(info.value)
    assert "stalled" in msg and "--min-rate" in msg
    assert not dest.exists()
    part = dest.with_name("m.pth.part")
    if part.exists():  # what arrived is kept for resuming, and the message says where and how much
        assert str(part) in msg and "resumes" in msg


def test_overall_deadline_stops_a_slow_download_and_the_next_call_resumes(tmp_path):
    data = checkpoint_bytes(numel=100_000)  # 1.2 MB at 100 kB/s: 12 s
    dest = tmp_path / "m.pth"
    with Server({"m.pth": data}, rate=100_000) as srv:
        t0 = time.monotonic()
        with pytest.raises(W.WeightsError) as info:
            W.download(srv.base + "/m.pth", dest, timeout=5, deadline=1.0, min_rate=1000, stall_window=5)
        assert time.monotonic() - t0 < 3
        msg = str(info.value)
        part = dest.with_name("m.pth.part")
        kept = part.stat().st_size
        assert 0 < kept < len(data)
        assert "deadline of 1 s" in msg and "--deadline" in msg and str(part) in msg
        srv.httpd.rate = None
        res = W.download(srv.base + "/m.pth", dest, timeout=5)
    assert dest.read_bytes() == data and res.resumed_from == [kept]


def test_deadline_also_bounds_a_server_that_trickles_its_headers(tmp_path):
    dest = tmp_path / "m.pth"
    with Server({}, header_trickle=True) as srv:
        t0 = time.monotonic()
        with pytest.raises(W.WeightsError, match="deadline"):
            W.download(srv.base + "/m.pth", dest, timeout=5, deadline=1.0, min_rate=None)
        assert time.monotonic() - t0 < 3


def test_download_command_has_deadline_and_stall_options(tmp_path, monkeypatch, capsys):
    data = checkpoint_bytes(numel=50_000)
    with Server({"sam_med3d.pth": data}, rate=20) as srv:
        monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", srv.base)
        t0 = time.monotonic()
        assert download_main(["sam-med3d", "--timeout", "5", "--min-rate", "1000", "--stall-window", "1"]) == 1
        assert time.monotonic() - t0 < 4
    assert "stalled" in capsys.readouterr().err
    assert download_main(["--deadline", "0"]) == 2
    assert "--deadline" in capsys.readouterr().err


# ------------------------------------------------------------------ item 11: full disk, read-only cache

@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    """A real small or read-only file system where this process may mount one (root on Linux)."""
    where.mkdir(parents=True, exist_ok=True)
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount")):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          timeout=20)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20)


def _inject_enospc(monkeypatch, after: int):
    """Make writes into ``*.part`` fail with ENOSPC once ``after`` bytes were written."""
    real_open = open

    class Full:
        def __init__(self, f):
            self._f, self._n = f, 0

        def write(self, b):
            if self._n + len(b) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._n += len(b)
            return self._f.write(b)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if str(path).endswith(".part") and "b" in mode else f

    monkeypatch.setattr(W.fetch, "open", fake_open, raising=False)


@pytest.mark.parametrize("how", ["injected", "tmpfs"])
def test_full_disk_gives_one_line_and_removes_the_part(tmp_path, monkeypatch, capsys, how):
    data = checkpoint_bytes(numel=200_000)  # 2.4 MB
    if how == "tmpfs":
        home = _tmpfs(tmp_path / "small", "size=1m")
        stack = contextlib.ExitStack()
        monkeypatch.setenv("SAM3D_HOME", str(stack.enter_context(home)))
    else:
        stack = contextlib.ExitStack()
        _inject_enospc(monkeypatch, after=500_000)
    with stack, Server({"sam_med3d.pth": data}) as srv:
        monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", srv.base)
        assert download_main(["sam-med3d"]) == 1
        err = capsys.readouterr().err
        left = _left_in(W.checkpoint_dir())
    assert err.count("\n") == 1, err  # one line
    assert "No space left on device" in err and "ENOSPC" in err and "SAM3D_HOME" in err
    assert "partial download" in err and "was deleted" in err
    assert left == []  # no .part filling the disk, no .part.json, no lock


def test_read_only_cache_injected_gives_one_line(tmp_path, monkeypatch, capsys):
    real = os.open
    cache = str(tmp_path / "home")

    def ro_open(path, flags, *args, **kwargs):
        if str(path).startswith(cache) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args, **kwargs)

    _folder(tmp_path).mkdir(parents=True)
    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", "http://127.0.0.1:9")
    assert download_main(["sam-med3d"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err and "SAM3D_HOME" in err
    assert "--checkpoint PATH" in err


def test_read_only_cache_tmpfs_gives_one_line(tmp_path, monkeypatch, capsys):
    with _tmpfs(tmp_path / "ro", "ro") as home:
        monkeypatch.setenv("SAM3D_HOME", str(home))
        monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", "http://127.0.0.1:9")
        assert download_main(["sam-med3d"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err and "SAM3D_HOME" in err


# ------------------------------------------------------------------ advice names real options

class CustomObject:  # not on the safe-loading allow-list
    pass


def _cli_options() -> set:
    found = set()
    for path in (REPO / "SAM3DSegmentLib").rglob("*.py"):
        found.update(re.findall(r"add_argument\(\s*(?:\"-\w\",\s*)?\"(--[a-z][a-z0-9-]*)\"", path.read_text(encoding="utf-8")))
    return found


def test_advice_in_loader_and_download_messages_names_existing_options(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d, load_checkpoint

    options = _cli_options()
    assert {"--checkpoint", "--model", "--repair", "--deadline", "--min-rate", "--stall-window"} <= options

    model = build_sam_med3d(SamMed3DConfig.tiny())
    torch.save({"model_state_dict": model.state_dict(), "x": CustomObject()}, tmp_path / "custom.pth")
    messages = []
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "custom.pth", config=SamMed3DConfig.tiny())
    messages.append(str(info.value))
    _pin_like_an_old_version(tmp_path, HTML)
    with pytest.raises(W.WeightsError) as info:
        W.resolve_checkpoint("sam-med3d", download=False)
    messages.append(str(info.value))
    for msg in messages:
        named = set(re.findall(r"--[a-z][a-z0-9-]*", msg))
        assert named <= options, (named - options, msg)
    assert "--trust-checkpoint" not in messages[0] and "trusted=True" in messages[0]


# ------------------------------------------------------------------ item 6 through the torch loader

def _spy_builds(monkeypatch):
    """Record the default device of every model build (the real one must never run for a bad file)."""
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models.sam_med3d import model as sam3d

    devices = []
    real = sam3d.build_sam_med3d

    def spy(config=None):
        devices.append(str(torch.empty(0).device))
        return real(config)

    monkeypatch.setattr(sam3d, "build_sam_med3d", spy)
    return devices


def test_small_file_asking_for_a_huge_model_is_refused_before_it_is_built(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models import SamMed3DConfig, load_checkpoint

    devices = _spy_builds(monkeypatch)
    wide = SamMed3DConfig.vit_b_ori(encoder_embed_dim=1536).to_dict()  # 1.4 GB of float32 parameters
    path = tmp_path / "wide.pt"
    torch.save({"format": "sam3dsegment-checkpoint/1", "config": wide,
                "model_state_dict": {"image_encoder.pos_embed": torch.zeros(1, 8, 8, 8, 1536)[..., :1].clone()}},
               path)
    assert path.stat().st_size < 10_000
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(path)
    assert devices and all(d == "meta" for d in devices), devices  # only the memory-free skeleton was built


@pytest.mark.parametrize("field,value", [("encoder_embed_dim", 1_048_576), ("encoder_depth", 100_000),
                                         ("decoder_mlp_dim", 10 ** 9)])
def test_config_outside_the_family_envelope_is_refused_before_anything_is_built(tmp_path, monkeypatch, field,
                                                                                 value):
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models import SamMed3DConfig, load_checkpoint

    devices = _spy_builds(monkeypatch)
    cfg = SamMed3DConfig.tiny().to_dict()
    cfg[field] = value
    if field == "encoder_embed_dim":
        cfg["encoder_num_heads"] = 4
    path = tmp_path / "huge.pt"
    torch.save({"config": cfg, "model_state_dict": {"image_encoder.x": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=f"known SAM-Med3D-family architecture: {field}={value}"):
        load_checkpoint(path)
    assert devices == []


def test_legacy_file_whose_storage_header_claims_more_than_it_holds(tmp_path):
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models import load_checkpoint

    path = tmp_path / "legacy.pth"
    torch.save({"model_state_dict": {"image_encoder.x": torch.zeros(4)}}, path, _use_new_zipfile_serialization=False)
    raw = bytearray(path.read_bytes())
    assert int.from_bytes(raw[-24:-16], "little") == 4  # the element count before the last 16 data bytes
    raw[-24:-16] = (10 ** 10).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="Refusing to allocate"):
        load_checkpoint(path)
    path.write_bytes(bytes(raw[:-24]))  # truncated before its data
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_zip_bomb_through_the_loader(tmp_path):
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models import load_checkpoint

    path = tmp_path / "bomb.pth"
    torch.save({"model_state_dict": {"image_encoder.x": torch.zeros(4)}}, path)
    # Re-pack with deflate and make one storage huge: torch would read 256 MiB from a ~300 kB file.
    with zipfile.ZipFile(path) as src:
        members = {i.filename: src.read(i) for i in src.infolist()}
    key = next(n for n in members if "/data/" in n)
    members[key] = bytes(256 << 20)
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"K\x04t", b"J" + (64 << 20).to_bytes(4, "little") + b"t")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, blob in members.items():
            dst.writestr(name, blob)
    members.clear()
    assert path.stat().st_size < 2 << 20
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_checkpoint(path)


def test_adapter_config_outside_its_bounds_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models import SamMed3DConfig, load_checkpoint

    devices = _spy_builds(monkeypatch)
    cfg = SamMed3DConfig.tiny().to_dict()
    cfg["adapter"] = {"kind": "adapter3d", "bottleneck_ratio": 1e6, "kernel_size": 3}
    torch.save({"config": cfg, "model_state_dict": {"image_encoder.x": torch.zeros(2)}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="adapter bottleneck_ratio=1000000.0"):
        load_checkpoint(tmp_path / "a.pt")
    assert devices == []
