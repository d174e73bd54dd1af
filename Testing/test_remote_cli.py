"""``sam3d serve`` start-up checks, and ``sam3d segment`` / ``sam3d evaluate`` with ``--server`` (the shared
option group of cli/options.py): same results as local runs, the key from a file or the environment (never
the command line), clear failures."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")

from SAM3DSegmentLib import cli  # noqa: E402
from SAM3DSegmentLib.io.volumes import read_volume  # noqa: E402
from SAM3DSegmentLib.data.phantoms import sphere_phantom  # noqa: E402
from SAM3DSegmentLib.remote.options import KEY_ENV, read_key  # noqa: E402
from SAM3DSegmentLib.remote.serve import load_models, read_keys  # noqa: E402

from _remote_fixtures import KEY, serving  # noqa: E402


@pytest.fixture(scope="module")
def demo_server():
    models = load_models(["demo"], device="cpu")
    with serving(models, keys=[KEY]) as srv:
        yield srv


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    image, truth = sphere_phantom(shape_ijk=(60, 56, 40), spacing=(1.3, 1.3, 2.0), radius_mm=12.0, noise=8.0)
    path = tmp_path_factory.mktemp("img") / "ball.nii.gz"
    from SAM3DSegmentLib.io.volumes import write_volume

    write_volume(image, str(path))
    return str(path), truth.meta["centre_ras"]


def test_serve_refuses_to_start_unsafely(capsys, monkeypatch, tmp_path):
    """Refused before any model is loaded: usage errors exit 2, unusable keys 1; one line each."""
    import SAM3DSegmentLib.remote.serve as serve_lib

    monkeypatch.setattr(serve_lib, "load_models", lambda *a, **k: pytest.fail("loaded a model for a refused start"))
    monkeypatch.delenv("SAM3D_SERVER_KEYS", raising=False)

    def refused(argv, status, text):
        assert cli.main(["serve", *argv]) == status
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1 and err.startswith("sam3d serve: error:"), err

    refused(["--host", "0.0.0.0"], 2, "exposes the server to the network")
    refused(["--checkpoint", "no-equals-sign"], 2, "NAME=PATH")
    refused(["--ssl-certfile", "x.pem"], 2, "both --ssl-certfile and --ssl-keyfile")
    refused(["--port", "70000"], 2, "port number")
    refused(["--cache-mb", "0"], 2, "--cache-mb")
    refused(["--keys-file", str(tmp_path / "missing.keys")], 1, "--keys-file")
    monkeypatch.setenv("SAM3D_SERVER_KEYS", "short")
    refused([], 1, "shorter than 16 characters")


def test_serve_reports_a_bad_model_in_one_line(capsys, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert cli.main(["serve", "--checkpoint", f"mine={tmp_path / 'junk.pth'}", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sam3d serve: error: model mine: could not load checkpoint") and err.count("\n") == 1


def test_key_sources(tmp_path, monkeypatch):
    f = tmp_path / "k"
    f.write_text("\n  secret-key-from-file-xyz  \nsecond\n")
    assert read_key(str(f), environ={}) == "secret-key-from-file-xyz"
    assert read_key(None, environ={KEY_ENV: " env-key "}) == "env-key"
    assert read_key(None, environ={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_key(str(tmp_path / "empty"), environ={})
    keys = tmp_path / "server.keys"
    keys.write_text("# comment\nkey-one-0123456789abc\n\nkey-two-0123456789abc\n")
    assert read_keys(str(keys), environ={"SAM3D_SERVER_KEYS": "key-three-0123456789, "}) == [
        "key-one-0123456789abc", "key-two-0123456789abc", "key-three-0123456789"]
    from SAM3DSegmentLib.cli.runner import command_parser

    for command in ("segment", "evaluate", "serve"):
        parser = command_parser(cli.COMMANDS[command])
        key_options = [o for a in parser._actions for o in a.option_strings if "key" in o]
        # a key itself is never a command-line argument: only files holding keys
        assert key_options == {"serve": ["--keys-file", "--ssl-keyfile"]}.get(command, ["--server-key-file"])


def test_segment_with_server_matches_local(demo_server, image_file, tmp_path, monkeypatch, capsys):
    path, centre = image_file
    clicks = ["--click", ",".join(f"{v:.2f}" for v in centre),
              "--click", ",".join(f"{v:.2f}" for v in np.asarray(centre) + [4, -3, 2])]
    local_out, remote_out = tmp_path / "local.nii.gz", tmp_path / "remote.nii.gz"
    assert cli.main(["segment", path, *clicks, "--model", "demo", "--device", "cpu", "--out", str(local_out),
                     "-q"]) == 0
    monkeypatch.setenv(KEY_ENV, KEY)
    timings = tmp_path / "t.json"
    assert cli.main(["segment", path, *clicks, "--model", "demo", "--server", demo_server.url, "--wire-dtype",
                     "float32", "--server-mode", "full", "--out", str(remote_out), "--timings", str(timings)]) == 0
    out = capsys.readouterr().out
    assert "full mode" in out and demo_server.url in out
    a, b = read_volume(str(local_out)).array, read_volume(str(remote_out)).array
    assert a.sum() > 500
    np.testing.assert_array_equal(a, b)
    report = json.loads(timings.read_text(encoding="utf-8"))
    assert report["server"] == [demo_server.url] and report["server_mode"] == "full"
    assert len(report["checkpoint_sha256"]) == 64
    # split mode with the key from a file (environment cleared)
    monkeypatch.delenv(KEY_ENV)
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    split_out = tmp_path / "split.nii.gz"
    assert cli.main(["segment", path, *clicks, "--server", demo_server.url, "--server-key-file", str(key_file),
                     "--server-mode", "split", "--wire-dtype", "float32", "--out", str(split_out), "-q"]) == 0
    np.testing.assert_array_equal(read_volume(str(split_out)).array, a)
    # split mode decoding with local torch from the same checkpoint file (the server checks its sha256)
    from SAM3DSegmentLib.weights import resolve_checkpoint

    demo_file = str(resolve_checkpoint("demo"))
    torch_out = tmp_path / "torch.nii.gz"
    assert cli.main(["segment", path, *clicks, "--server", demo_server.url, "--server-key-file", str(key_file),
                     "--checkpoint", demo_file, "--wire-dtype", "float32", "--out", str(torch_out)]) == 0
    assert "decoder: local torch" in capsys.readouterr().out
    np.testing.assert_array_equal(read_volume(str(torch_out)).array, a)
    refused_out = tmp_path / "refused.nii.gz"
    assert cli.main(["segment", path, *clicks, "--server", demo_server.url, "--server-key-file", str(key_file),
                     "--checkpoint", demo_file, "--server-mode", "full", "--out", str(refused_out)]) == 1
    assert "local decoder of split mode" in capsys.readouterr().err and not refused_out.exists()


def test_segment_with_a_refused_key_fails_clearly_and_writes_nothing(demo_server, image_file, tmp_path, monkeypatch,
                                                                     capsys):
    path, centre = image_file
    monkeypatch.setenv(KEY_ENV, "not-the-right-key-123456")
    out = tmp_path / "never.nii.gz"
    rc = cli.main(["segment", path, "--click", ",".join(f"{v:.2f}" for v in centre), "--server", demo_server.url,
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "refused the key" in err and err.count("\n") == 1
    assert "not-the-right-key" not in err
    assert not out.exists()
    monkeypatch.delenv(KEY_ENV)
    rc = cli.main(["segment", path, "--click", ",".join(f"{v:.2f}" for v in centre), "--server", demo_server.url,
                   "--server-key-file", str(tmp_path / "nope.txt"), "--out", str(out)])
    assert rc == 1 and "--server-key-file" in capsys.readouterr().err and not out.exists()
    rc = cli.main(["segment", path, "--click", ",".join(f"{v:.2f}" for v in centre), "--server", "ftp://x",
                   "--out", str(out)])
    assert rc == 1 and "must look like https://host:port" in capsys.readouterr().err


def _write_dataset(root):
    import SimpleITK as sitk

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image, mask = sphere_phantom(shape_ijk=(40, 36, 24), spacing=(1.5, 1.5, 2.0), radius_mm=9.0, hu_inside=150.0,
                                 hu_background=-50.0, noise=5.0, seed=0)
    sitk.WriteImage(image.to_sitk(), str(root / "imagesTr" / "case00_0000.nii.gz"))
    sitk.WriteImage(image.to_sitk(np.asarray(mask.array).astype(np.uint8)), str(root / "labelsTr" / "case00.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "ball": 1},
                                                   "numTraining": 1, "file_ending": ".nii.gz"}))


def test_evaluate_with_server_matches_local(demo_server, tmp_path, monkeypatch):
    from SAM3DSegmentLib.cli.evaluate import main as evaluate_main

    _write_dataset(tmp_path / "ds")
    common = ["--data", str(tmp_path / "ds"), "--model", "demo", "--clicks", "2", "--protocol", "engine", "--quiet"]
    assert evaluate_main(common + ["--device", "cpu", "--out", str(tmp_path / "local")]) == 0
    monkeypatch.setenv(KEY_ENV, KEY)
    assert evaluate_main(common + ["--server", demo_server.url, "--wire-dtype", "float32",
                                   "--out", str(tmp_path / "remote")]) == 0

    def dice(folder):
        return [(r["click"], r["dice"]) for r in csv.DictReader(open(folder / "per_case.csv", newline=""))]

    assert dice(tmp_path / "local") == dice(tmp_path / "remote")
    summary = json.loads((tmp_path / "remote" / "summary.json").read_text(encoding="utf-8"))
    local = json.loads((tmp_path / "local" / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"]["checkpoint_sha256"] == local["model"]["checkpoint_sha256"]
    assert summary["model"]["server"] == [demo_server.url]
