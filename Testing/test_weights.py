"""Named weights, cache directory and the resumable download, against an HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import socket
import sys
import threading
import urllib.error
from pathlib import Path

import pytest

from SAM3DSegmentLib import weights as W
from SAM3DSegmentLib.cli.download import main as download_main

from _checkpoint_bytes import checkpoint_bytes  # noqa: E402  (Testing/ is on sys.path under pytest)
from _loopback_http import LoopbackServer, isolated_download_env  # noqa: E402,F401 (autouse fixture)

SIZE = 3 * 1024 * 1024 + 12345  # a few MB, not a multiple of the chunk size


def _payload(size: int = SIZE, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _left_in(folder: Path, *keep: str):
    """Files in ``folder`` besides ``keep`` and the empty ``<file>.lock`` that filelock may leave after release
    (its presence means nothing; a lock file holding anything would be listed)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in keep and not (p.name.endswith(".lock") and p.is_file() and p.stat().st_size == 0))


def _leftovers(dest: Path):
    return _left_in(dest.parent, dest.name)


# ------------------------------------------------------------------------------------------ registry

def test_registry_entries():
    turbo = W.get_weights("sam-med3d-turbo")
    base = W.get_weights("SAM-Med3D")  # case-insensitive
    for entry, fname in ((turbo, "sam_med3d_turbo.pth"), (base, "sam_med3d.pth")):
        assert entry.filename == fname
        assert entry.url == f"https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/{fname}"
        assert entry.architecture == "vit_b_ori"
        assert "Apache-2.0" in entry.license and entry.description
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert not entry.bundled and not entry.clinical_use
    assert turbo.checksum_source and "huggingface.co" in turbo.checksum_source
    demo = W.get_weights("demo")
    assert demo.bundled and demo.url is None and demo.download_url() is None
    assert demo.bundled_path() == Path(W.__file__).resolve().parents[1] / "resources" / "demo_model.pt"
    assert "not for clinical use" in demo.description.lower() and not demo.clinical_use
    assert W.DEFAULT_MODEL in W.known_names()
    with pytest.raises(W.WeightsError, match="sam-med3d-turbo"):
        W.get_weights("no-such-model")


def test_mirror_base_url_override(monkeypatch):
    entry = W.get_weights("sam-med3d-turbo")
    assert entry.download_url() == entry.url
    monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", "http://mirror.example/weights/")
    assert entry.download_url() == "http://mirror.example/weights/sam_med3d_turbo.pth"


# ------------------------------------------------------------------------------------------ cache dir

def test_cache_dir_from_sam3d_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "custom"))
    assert W.cache_dir() == tmp_path / "custom"
    assert W.checkpoint_dir() == tmp_path / "custom" / "checkpoints"
    assert W.cached_path("sam-med3d") == tmp_path / "custom" / "checkpoints" / "sam_med3d.pth"
    assert not (tmp_path / "custom").exists()  # not created by merely asking


def test_cache_dir_platform_defaults(monkeypatch, tmp_path):
    """Without $SAM3D_HOME the folder comes from platformdirs; each platform's class gives the documented path."""
    import platformdirs
    from platformdirs.macos import MacOS
    from platformdirs.unix import Unix
    from platformdirs.windows import Windows

    monkeypatch.delenv("SAM3D_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(platformdirs, "PlatformDirs", Unix)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.cache_dir() == tmp_path / "xdg" / "sam3dsegment"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG spec: relative paths are ignored
    assert W.cache_dir() == tmp_path / ".cache" / "sam3dsegment"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert W.cache_dir() == tmp_path / ".cache" / "sam3dsegment"
    assert W.checkpoint_dir() == tmp_path / ".cache" / "sam3dsegment" / "checkpoints"
    monkeypatch.setattr(platformdirs, "PlatformDirs", MacOS)
    assert W.cache_dir() == tmp_path / "Library" / "Caches" / "sam3dsegment"
    monkeypatch.setattr(platformdirs, "PlatformDirs", Windows)
    local = "C:\\Users\\someone\\AppData\\Local"  # platformdirs' override of the Local AppData known folder
    monkeypatch.setenv("WIN_PD_OVERRIDE_LOCAL_APPDATA", local)
    assert W.cache_dir() == Path(local) / "sam3dsegment" / "Cache"
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "Library").exists()  # nothing created


def test_cache_dir_needs_platformdirs_only_without_sam3d_home(monkeypatch, tmp_path):
    """A missing helper library is one clear message naming the package and the fix; $SAM3D_HOME needs none."""
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # what an environment without it answers
    assert W.cache_dir() == tmp_path / "home"
    monkeypatch.delenv("SAM3D_HOME")
    with pytest.raises(W.WeightsError, match=r"'platformdirs' is needed to find the model cache folder.*"
                                             r"pip install platformdirs"):
        W.cache_dir()


# ------------------------------------------------------------------------------------------ download

def test_full_download_with_progress(tmp_path):
    data = _payload()
    dest = tmp_path / "dl" / "model.pth"
    calls = []
    with LoopbackServer({"model.pth": data}) as srv:
        res = W.download(srv.url("model.pth"), dest, expected_size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), progress=lambda d, t: calls.append((d, t)))
    assert dest.read_bytes() == data
    assert res.sha256 == hashlib.sha256(data).hexdigest() and res.size == len(data)
    assert res.resumed_from == [] and res.restarts == 0 and not res.already_present
    assert calls[0] == (0, len(data)) and calls[-1] == (len(data), len(data))
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    assert _leftovers(dest) == []  # no .part, .part.json or .lock left behind
    assert len(srv.requests) == 1 and srv.requests[0]["range"] is None


def test_resume_after_interruption_within_one_call(tmp_path):
    data = _payload()
    cut = 1_000_000
    dest = tmp_path / "model.pth"
    with LoopbackServer({"model.pth": data}, cut_first=cut) as srv:
        res = W.download(srv.url("model.pth"), dest, sha256=hashlib.sha256(data).hexdigest(), retries=2)
    assert dest.read_bytes() == data
    assert len(srv.requests) == 2
    first, second = srv.requests
    assert first["range"] is None and first["sent"] == cut
    assert second["range"] == f"bytes={cut}-" and second["status"] == 206
    assert second["if_range"] == '"' + hashlib.md5(data).hexdigest() + '"'
    assert second["sent"] == len(data) - cut  # only the remainder crossed the wire
    assert res.resumed_from == [cut]
    assert _leftovers(dest) == []


def test_resume_across_calls_keeps_partial_file(tmp_path):
    data = _payload()
    cut = 700_000
    dest = tmp_path / "model.pth"
    part = tmp_path / "model.pth.part"
    with LoopbackServer({"model.pth": data}, cut_first=cut) as srv:
        with pytest.raises(W.WeightsError, match="again to resume"):
            W.download(srv.url("model.pth"), dest, retries=0)
        assert not dest.exists()
        assert part.read_bytes() == data[:cut]
        res = W.download(srv.url("model.pth"), dest, retries=0)
    assert dest.read_bytes() == data
    assert srv.requests[1]["range"] == f"bytes={cut}-"
    assert srv.requests[1]["sent"] == len(data) - cut
    assert res.resumed_from == [cut] and res.sha256 == hashlib.sha256(data).hexdigest()
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    data = _payload()
    cut = 500_000
    dest = tmp_path / "model.pth"
    with LoopbackServer({"model.pth": data}, cut_first=cut, ignore_range=True) as srv:
        res = W.download(srv.url("model.pth"), dest, sha256=hashlib.sha256(data).hexdigest(), retries=1)
    assert dest.read_bytes() == data  # not the first 500 kB followed by the whole file again
    assert srv.requests[1]["range"] == f"bytes={cut}-" and srv.requests[1]["status"] == 200
    assert res.restarts == 1 and res.resumed_from == []
    assert _leftovers(dest) == []


def test_partial_file_without_metadata_is_not_trusted(tmp_path):
    data = _payload()
    dest = tmp_path / "model.pth"
    (tmp_path / "model.pth.part").write_bytes(b"garbage from somewhere else" * 100)
    with LoopbackServer({"model.pth": data}) as srv:
        W.download(srv.url("model.pth"), dest)
    assert dest.read_bytes() == data
    assert srv.requests[0]["range"] is None


def test_checksum_mismatch_deletes_part_and_names_hashes(tmp_path):
    data = _payload()
    wrong = "0" * 64
    dest = tmp_path / "model.pth"
    with LoopbackServer({"model.pth": data}) as srv:
        with pytest.raises(W.ChecksumError) as info:
            W.download(srv.url("model.pth"), dest, sha256=wrong)
    msg = str(info.value)
    assert wrong in msg and hashlib.sha256(data).hexdigest() in msg
    assert info.value.expected == wrong and info.value.actual == hashlib.sha256(data).hexdigest()
    assert not dest.exists() and _leftovers(dest) == []


def test_size_mismatch(tmp_path):
    data = _payload()
    dest = tmp_path / "model.pth"
    with LoopbackServer({"model.pth": data}) as srv:
        with pytest.raises(W.ChecksumError, match=str(len(data) + 1)):
            W.download(srv.url("model.pth"), dest, expected_size=len(data) + 1)
    assert not dest.exists() and _leftovers(dest) == []


def test_http_404_gives_local_file_instructions(tmp_path):
    dest = tmp_path / "model.pth"
    with LoopbackServer({}) as srv:
        with pytest.raises(W.WeightsError) as info:
            W.download(srv.url("model.pth"), dest)
    msg = str(info.value)
    assert "404" in msg and "--checkpoint" in msg and srv.url("model.pth") in msg
    assert "Checkpoint file" in msg and str(dest) in msg
    assert not dest.exists() and _leftovers(dest) == []


def test_connection_refused_mentions_checkpoint_option(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/sam_med3d_turbo.pth"
    dest = tmp_path / "sam_med3d_turbo.pth"
    with pytest.raises(W.WeightsError) as info:
        W.download(url, dest, timeout=5)
    msg = str(info.value)
    assert "refused" in msg and "--checkpoint" in msg and '"Checkpoint file"' in msg
    assert url in msg and str(dest) in msg
    assert not dest.exists()


def test_dns_failure_is_explained(tmp_path, monkeypatch):
    def fail(request, timeout):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(W.fetch, "_urlopen", fail)
    with pytest.raises(W.WeightsError, match="resolved") as info:
        W.download("http://weights.invalid/x.pth", tmp_path / "x.pth")
    assert "--checkpoint" in str(info.value)


def test_concurrent_downloads_of_the_same_file(tmp_path):
    data = _payload()
    dest = tmp_path / "model.pth"
    results, errors = [], []
    with LoopbackServer({"model.pth": data}, delay=0.3) as srv:
        def worker():
            try:
                results.append(W.download(srv.url("model.pth"), dest, sha256=hashlib.sha256(data).hexdigest(),
                                          lock_timeout=30))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert dest.read_bytes() == data
    assert len(srv.requests) == 1  # the second thread waited and reused the finished file
    assert sorted(r.already_present for r in results) == [False, True]
    assert _leftovers(dest) == []


def test_lock_wait_times_out(tmp_path):
    lock_path = tmp_path / "model.pth.lock"
    with W.DownloadLock(lock_path):
        with pytest.raises(W.WeightsError, match="waiting for another download"):
            W.DownloadLock(lock_path, timeout=0.3).acquire()
    with W.DownloadLock(lock_path, timeout=1):  # released: can be taken again
        pass
    assert _left_in(tmp_path) == []  # at most an empty lock file stays


def test_text_progress_bar():
    out = io.StringIO()
    bar = W.TextProgress("Downloading x", stream=out, min_interval=0)
    for done in (0, 50, 100):
        bar(done, 100)
    assert bar._bar.n == 100
    bar(20, 100)  # the server ignored a resume: the count restarts, it does not add up
    assert bar._bar.n == 20
    bar(100, 100)
    bar.close()
    text = out.getvalue()
    assert "Downloading x" in text and "100%" in text and "50%" in text and text.endswith("\n")


# ------------------------------------------------------------------------------------------ resolve

def test_resolve_local_path(tmp_path):
    ckpt = tmp_path / "my model.pth"
    ckpt.write_bytes(b"weights")
    assert W.resolve_checkpoint(ckpt) == ckpt
    assert W.resolve_checkpoint(str(ckpt)) == ckpt
    with pytest.raises(W.WeightsError, match="not found") as info:
        W.resolve_checkpoint(tmp_path / "missing.pth")
    assert "sam-med3d-turbo" in str(info.value)
    with pytest.raises(W.WeightsError, match="directory"):
        W.resolve_checkpoint(tmp_path)
    with pytest.raises(W.WeightsError, match="not found"):
        W.resolve_checkpoint("not-a-model-name")


def test_resolve_name_downloads_once_and_trusts_on_first_use(tmp_path, monkeypatch, caplog):
    data = checkpoint_bytes(numel=120_000, seed=1)  # a SAM-Med3D-like torch.save file, 1.4 MB
    digest = hashlib.sha256(data).hexdigest()
    with LoopbackServer({"sam_med3d.pth": data}) as srv:
        monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", srv.base + "/")
        with caplog.at_level(logging.WARNING, logger=W.__name__):
            path = W.resolve_checkpoint("sam-med3d", progress=None)
        assert path == tmp_path / "home" / "checkpoints" / "sam_med3d.pth"
        assert path.read_bytes() == data
        record = json.loads(W.sidecar_path(path).read_text(encoding="utf-8"))
        assert record["sha256"] == digest and record["verified"] == "trust-on-first-use"
        assert record["size"] == len(data)
        assert "trust on first use" in caplog.text and digest in caplog.text
        assert "first use" in W.checksum_status(path, W.get_weights("sam-med3d"))
        # Second resolve: served from the cache and checked against the record, no new request.
        assert W.resolve_checkpoint("sam-med3d", progress=None) == path
        assert len(srv.requests) == 1
    # A changed cached file is refused, left in place, and the message explains what to do.
    middle = len(data) // 2  # inside the tensor data
    path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
    with pytest.raises(W.ChecksumError) as info:
        W.resolve_checkpoint("sam-med3d")
    assert digest in str(info.value) and "--checkpoint" in str(info.value)
    assert path.exists()


def test_resolve_enforces_published_checksum(tmp_path, monkeypatch):
    fake = _payload(200_000, seed=2)
    entry = W.get_weights("sam-med3d-turbo")
    assert entry.sha256  # published on the Hugging Face file page
    with LoopbackServer({"sam_med3d_turbo.pth": fake}) as srv:
        monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", srv.base)
        with pytest.raises(W.ChecksumError) as info:
            W.resolve_checkpoint("sam-med3d-turbo", progress=None)
    assert entry.sha256 in str(info.value) and hashlib.sha256(fake).hexdigest() in str(info.value)
    assert _left_in(tmp_path / "home" / "checkpoints") == []


def test_resolve_manually_copied_file_is_picked_up(tmp_path, caplog):
    target = W.cached_path("sam-med3d")
    target.parent.mkdir(parents=True)
    copied = checkpoint_bytes(seed=4)
    target.write_bytes(copied)
    with caplog.at_level(logging.WARNING, logger=W.__name__):
        assert W.resolve_checkpoint("sam-med3d", download=False) == target
    assert "trust on first use" in caplog.text
    rows = W.list_cache()
    assert [(r["name"], r["size"]) for r in rows] == [("sam-med3d", len(copied))]


def test_resolve_without_download_explains_offline_options(tmp_path):
    with pytest.raises(W.WeightsError) as info:
        W.resolve_checkpoint("sam-med3d-turbo", download=False)
    msg = str(info.value)
    assert "--checkpoint" in msg and "Checkpoint file" in msg
    assert str(tmp_path / "home" / "checkpoints" / "sam_med3d_turbo.pth") in msg
    assert "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth" in msg


def test_resolve_bundled_model_missing_is_clear():
    entry = W.register_weights(W.ModelWeights(
        name="test-bundled-missing", filename="no_such_file_for_tests.pt", url=None, size=None, sha256=None,
        architecture="tiny", license="Apache-2.0", description="test", bundled=True))
    try:
        with pytest.raises(W.WeightsError, match="not included"):
            W.resolve_checkpoint(entry.name)
    finally:
        W.REGISTRY.pop(entry.name)


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    """A process that dies while holding the lock does not block later downloads (the OS drops it)."""
    import subprocess
    import sys

    lock_path = tmp_path / "model.pth.lock"
    code = ("import sys; from SAM3DSegmentLib.weights import DownloadLock\n"
            f"l = DownloadLock({str(lock_path)!r}).acquire()\n"
            "print('locked', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=str(Path(W.__file__).resolve().parents[2]))
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(W.WeightsError):
            W.DownloadLock(lock_path, timeout=0.2).acquire()
        proc.kill()  # dies without releasing: no cleanup code runs
        proc.wait(timeout=10)
        with W.DownloadLock(lock_path, timeout=5):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_default_text_progress_bar_on_stderr(tmp_path, capsys):
    data = _payload(400_000, seed=3)
    with LoopbackServer({"m.pth": data}) as srv:
        W.download(srv.url("m.pth"), tmp_path / "m.pth", progress=True)
    err = capsys.readouterr().err
    assert "Downloading m.pth" in err


def test_read_only_cache_record_failure_is_not_fatal(tmp_path, monkeypatch, caplog):
    target = W.cached_path("sam-med3d")
    target.parent.mkdir(parents=True)
    target.write_bytes(checkpoint_bytes(seed=5))

    def refuse(path, data, **kwargs):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(W.verify, "write_json", refuse)
    with caplog.at_level(logging.WARNING, logger=W.__name__):
        assert W.resolve_checkpoint("sam-med3d", download=False) == target
    assert "Could not record" in caplog.text and not W.sidecar_path(target).exists()


def test_download_command_lists_and_fails_offline_with_instructions(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path))
    assert download_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "sam-med3d-turbo" in out and "absent" in out
    monkeypatch.setenv("SAM3D_WEIGHTS_BASE_URL", "http://127.0.0.1:9/none")  # port 9: nothing listens
    assert download_main(["sam-med3d-turbo", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint PATH" in err and "connection refused" in err
    assert not list((tmp_path / "checkpoints").glob("sam_med3d_turbo.pth"))


def test_registry_imports_without_the_download_libraries():
    """The 3D Slicer module lists the models before its dependencies are installed: importing the package and
    reading the registry must not need platformdirs, filelock or tqdm (they are imported on first use)."""
    import subprocess

    code = ("import sys\n"
            "for m in ('platformdirs', 'filelock', 'tqdm'): sys.modules[m] = None\n"
            "from SAM3DSegmentLib import weights\n"
            "print(weights.DEFAULT_MODEL in weights.known_names())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(Path(W.__file__).resolve().parents[2]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_download_lock_without_filelock_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "filelock", None)
    with pytest.raises(W.WeightsError, match=r"'filelock' is needed to lock the model cache.*pip install filelock"):
        W.DownloadLock(tmp_path / "x.lock").acquire()


def test_bad_progress_argument_leaves_no_lock_held(tmp_path):
    dest = tmp_path / "model.pth"
    with pytest.raises(ValueError, match="progress must be") as info:
        W.download("http://127.0.0.1:9/model.pth", dest, progress="sometimes")
    assert info.tb is not None  # the failed call's frames (and whatever they hold) are still alive here
    with W.DownloadLock(tmp_path / "model.pth.lock", timeout=0.5):  # not left held by the failed call
        pass
