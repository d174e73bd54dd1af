"""Training on a fresh clone and under hostile conditions: missing demo data, learning-rate logs per
parameter group, a full disk during a checkpoint write (torch's own RuntimeError), stale temporaries."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import tiny_config, write_config, write_nnunet_dataset  # noqa: E402

from SAM3DSegmentLib.data import demo_data  # noqa: E402
from SAM3DSegmentLib.cli.train import main  # noqa: E402
from SAM3DSegmentLib.train import checkpointing  # noqa: E402
from SAM3DSegmentLib.train.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_nnunet_dataset(str(tmp_path_factory.mktemp("ds") / "Dataset001_Phantoms"))


def _config_file(tmp_path, dataset, out, **over):
    cfg = tiny_config(dataset, str(out), **over)
    return write_config(str(tmp_path / f"cfg_{abs(hash(str(out))) % 10**8}.json"), cfg)


def _err_lines(capsys):
    return [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------- demo data (item 8)
def test_tiny_config_writes_the_missing_demo_data_then_trains(tmp_path, monkeypatch, capsys):
    """`sam3d train configs/tiny.json` on a fresh clone: the data folder does not exist yet."""
    made = []

    def fast_demo_set(out, n_phantoms=8):  # the real set takes seconds to write and minutes to train on
        made.append(out)
        return write_nnunet_dataset(out)

    monkeypatch.setattr(demo_data, "make_demo_dataset", fast_demo_set)
    root = tmp_path / "runs" / "demo_data"
    cfg = load_config(str(REPO / "configs" / "tiny.json"))
    assert cfg.data.make_demo_data and cfg.data.roots == ["runs/demo_data"]
    rc = main([str(REPO / "configs" / "tiny.json"), "--set", f"data.roots=[\"{root}\"]",
               "--set", f"output_dir={tmp_path / 'run'}", "--set", "loop.epochs=1", "--set", "threads=1",
               "--set", "log.tensorboard=false"])
    assert rc == 0, capsys.readouterr().err
    assert (root / "dataset.json").is_file() and len(made) == 1
    assert (tmp_path / "run" / "final.pt").is_file()
    assert "writing the demo training set" in capsys.readouterr().out
    # the second run finds the folder and does not write it again
    assert demo_data.ensure_demo_dataset(str(root), log=lambda *a: None) is False and len(made) == 1


def test_a_missing_data_folder_says_how_to_make_the_demo_data(tmp_path, capsys):
    path = write_config(str(tmp_path / "c.json"), tiny_config(str(tmp_path / "no_such_data"), str(tmp_path / "r")))
    assert main([path]) == 1  # bad data: 1, as in every sam3d command
    lines = _err_lines(capsys)
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert f"sam3d train make-demo-data {tmp_path / 'no_such_data'}" in lines[0]
    assert not (tmp_path / "no_such_data").exists()


def test_an_interrupted_demo_data_write_leaves_no_half_written_folder(tmp_path, monkeypatch):
    def dies(out, n_phantoms=8):
        os.makedirs(os.path.join(out, "imagesTr"))
        Path(out, "imagesTr", "chest000_0000.nii.gz").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "make_demo_dataset", dies)
    with pytest.raises(KeyboardInterrupt):
        demo_data.ensure_demo_dataset(str(tmp_path / "demo_data"), log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == []


# --------------------------------------------------------------------------- learning rates (item 8)
def test_every_group_learning_rate_is_logged_by_name(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    path = _config_file(tmp_path, dataset, out, loop__epochs=1,
                        log={"progress": False, "print_every": 1, "tensorboard": "false"})
    assert main([path]) == 0
    text = capsys.readouterr().out
    # optim.lr 3e-3 with the default decoder_lr_scale 0.1: the decoder group runs at 3e-4
    assert "learning rate by parameter group: decoder 0.0003, encoder 0.003" in text
    step_lines = [ln for ln in text.splitlines() if " step " in ln and "loss" in ln]
    assert step_lines and all("lr decoder 0.0003, encoder 0.003" in ln for ln in step_lines)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "lr" not in rows[0]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows
    for r in train_rows:
        assert float(r["lr_encoder"]) == pytest.approx(3e-3) and float(r["lr_encoder_no_decay"]) == pytest.approx(3e-3)
        assert float(r["lr_decoder"]) == pytest.approx(3e-4) and float(r["lr_decoder_no_decay"]) == pytest.approx(3e-4)


# -------------------------------------------------------------------------- full disk (issue 9 item 11)
class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails like a full disk (ENOSPC)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            self.f.write(bytes(b[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)


def test_full_disk_inside_torch_save_is_one_line_keeps_the_last_checkpoint_and_exits_1(dataset, tmp_path,
                                                                                         monkeypatch, capsys):
    out = tmp_path / "run"
    path = _config_file(tmp_path, dataset, out, loop__epochs=1)
    assert main([path]) == 0
    good = {n: (out / n).read_bytes() for n in ("latest.pt", "best.pt", "final.pt")}
    capsys.readouterr()

    real_save = torch.save

    def save_then_disk_full(obj, f):  # the real torch.save: its zip writer raises RuntimeError
        real_save(obj, _FullDisk(f, 3000))

    monkeypatch.setattr(checkpointing, "_serialize", save_then_disk_full)
    with pytest.raises(RuntimeError):  # what torch does on its own (the reason for the translation)
        real_save({"x": torch.zeros(10000)}, _FullDisk(io.BytesIO(), 3000))
    assert main([path, "--set", "loop.epochs=2", "--resume", "auto"]) == 1
    lines = _err_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sam3d train: error: disk full while writing the checkpoint {out}{os.sep}")
    assert "is intact" in lines[0] and "Traceback" not in lines[0]
    assert {n: (out / n).read_bytes() for n in good} == good  # the last good checkpoints are untouched
    assert [n for n in os.listdir(out) if ".tmp" in n] == []


def test_a_torch_write_error_without_errno_is_named_by_the_free_space(tmp_path, monkeypatch):
    def fails(obj, f):
        f.write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpointing, "_serialize", fails)
    target = tmp_path / "latest.pt"
    target.write_bytes(b"previous")
    Usage = type("Usage", (), {})
    for free, needle, code in ((10 << 20, "disk full", errno.ENOSPC), (50 << 30, "torch.save failed", errno.EIO)):
        u = Usage()
        u.free = free
        monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p, u=u: u)
        with pytest.raises(checkpointing.CheckpointWriteError, match=needle) as info:
            checkpointing.atomic_save({"a": 1}, str(target))
        assert info.value.errno == code and "\n" not in str(info.value)
        assert target.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["latest.pt"]


# ---------------------------------------------------------------------- stale temporaries (issue 9 item 11)
def test_stale_checkpoint_temporaries_are_removed_at_the_next_start_and_only_ours(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ours = [".latest.pt.k3_9a0zq.tmp.pt", ".best.pt.abcdefgh.tmp.pt", ".final.pt.00000000.tmp.pt",
            ".encoder.pt.x_y_z_12.tmp.pt"]
    not_ours = [".latest.pt.k3_9a0zq.tmp.pt.keep", ".notes.pt.abcdefgh.tmp.pt", "latest.pt.abcdefgh.tmp.pt",
                ".latest.pt.ABCDEFGH.tmp.pt", ".latest.pt.short.tmp.pt", "my.tmp.pt", ".metrics.csv.abcdefgh.tmp"]
    for n in ours + not_ours:
        (out / n).write_bytes(b"partial checkpoint")
    (out / ".final.pt.abcdefgh.tmp.pt").mkdir()  # a folder with our pattern: not a temporary of ours
    not_ours.append(".final.pt.abcdefgh.tmp.pt")
    path = _config_file(tmp_path, dataset, out, loop__epochs=1)
    assert main([path]) == 0
    left = set(os.listdir(out))
    assert left.isdisjoint(ours)
    assert set(not_ours) <= left
    text = capsys.readouterr().out
    assert f"removed {len(ours)} temporary checkpoint file(s) left by an interrupted run" in text


def test_metrics_csv_of_an_older_run_resumes_with_the_new_columns(dataset, tmp_path):
    """A run resumed from a metrics.csv that still has the old single `lr` column keeps its rows."""
    out = tmp_path / "run"
    path = _config_file(tmp_path, dataset, out, loop__epochs=1)
    assert main([path]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    old_fields = ["kind", "epoch", "step", "loss", "lr", "dice", "dice_first_click", "seconds"]
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, old_fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, r.get("lr_encoder", "")) if k == "lr" else r.get(k, "") for k in old_fields})
    assert main([path, "--set", "loop.epochs=2", "--resume", "auto"]) == 0
    new = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    assert [r["loss"] for r in new[:len(rows)]] == [r["loss"] for r in rows]
    assert all(r["lr_encoder"] for r in new[len(rows):] if r["kind"] == "train")
    json.dumps(new)  # plain strings
