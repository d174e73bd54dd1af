"""Checkpoint loading as users hit it: wrappers, prefixes, CUDA tensors, weights_only, broken files."""
import argparse
import collections
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from SAM3DSegmentLib.inference.backends import LocalBackend  # noqa: E402
from SAM3DSegmentLib.models import (CheckpointError, SamMed3DConfig, build_sam_med3d,  # noqa: E402
                                    load_checkpoint, save_checkpoint)
from SAM3DSegmentLib.models.device import resolve_device, resolve_dtype  # noqa: E402


class NotAllowed:  # a custom class: safe loading must refuse it
    def __init__(self):
        self.x = 1


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_sam_med3d(SamMed3DConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_format_round_trip_rebuilds_config(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "tiny.pt", extra={"epoch": 3})
    loaded = load_checkpoint(path)
    assert loaded.config == tiny.config
    assert _same_weights(tiny, loaded)
    assert loaded.checkpoint_info["epoch"] == 3
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_published_layout_with_namespace_and_counter_loads_weights_only(tiny, tmp_path):
    sd = tiny.state_dict()
    obj = {"model_state_dict": sd, "epoch": 199, "args": argparse.Namespace(lr=8e-5, task_name="turbo"),
           "used_datas": collections.Counter({"a": 1}),
           "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4}]}}
    torch.save(obj, tmp_path / "published_like.pth")
    loaded = load_checkpoint(tmp_path / "published_like.pth", config=SamMed3DConfig.tiny())
    assert _same_weights(tiny, loaded)
    assert loaded.checkpoint_info["format"] == "sam-med3d"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tiny, tmp_path, prefix):
    torch.save({prefix + k: v for k, v in tiny.state_dict().items()}, tmp_path / "ddp.pth")
    loaded = load_checkpoint(tmp_path / "ddp.pth", config=SamMed3DConfig.tiny())
    assert _same_weights(tiny, loaded)


def test_partial_prefix_is_not_silently_accepted(tiny, tmp_path):
    sd = tiny.state_dict()
    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(tmp_path / "mixed.pth", config=SamMed3DConfig.tiny())


def test_cuda_saved_tensors_load_on_a_cpu_machine(tiny, tmp_path):
    """Forge a legacy-format file whose storages are tagged 'cuda:0', as the turbo file's are."""
    path = tmp_path / "cuda.pth"
    torch.save({"model_state_dict": tiny.state_dict()}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    forged = raw.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")  # BINUNICODE location tag
    assert forged != raw
    path.write_bytes(forged)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does here
            torch.load(path, weights_only=True)
    loaded = load_checkpoint(path, config=SamMed3DConfig.tiny())
    assert _same_weights(tiny, loaded)
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_truncated_file_has_a_clear_error(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "full.pt")
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"<!DOCTYPE html><html>Not found</html>", "HTML page"),
    (b"\x00\x01garbage-bytes", "not a PyTorch checkpoint"),
])
def test_non_checkpoint_files(tmp_path, content, match):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*--checkpoint"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_wrong_architecture_lists_mismatched_keys_and_never_returns_a_model(tiny, tmp_path):
    torch.save({"model_state_dict": tiny.state_dict()}, tmp_path / "small.pth")  # no config inside
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "small.pth")  # -> assumed vit_b_ori
    msg = str(err.value)
    assert "wrong shape" in msg and "image_encoder.pos_embed" in msg and "vit_b_ori" in msg


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd.pop("mask_decoder.iou_token.weight")
    sd["image_encoder.blocks.0.attn.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "broken.pth", config=SamMed3DConfig.tiny())
    msg = str(err.value)
    assert "1 missing keys [mask_decoder.iou_token.weight]" in msg
    assert "1 unexpected keys [image_encoder.blocks.0.attn.extra]" in msg


def test_no_weights_inside(tmp_path):
    torch.save({"epoch": 1, "args": argparse.Namespace(a=1)}, tmp_path / "meta_only.pth")
    with pytest.raises(CheckpointError, match="no model weights"):
        load_checkpoint(tmp_path / "meta_only.pth")


def test_adapter_only_and_encoder_only_files_say_how_to_get_a_model(tiny, tmp_path):
    trained = {k: v for k, v in tiny.state_dict().items() if k.startswith("image_encoder.neck")}
    torch.save({"format": "sam3dsegment-partial/1", "config": tiny.config.to_dict(), "mode": "adapter3d",
                "base": {"path": "/data/sam_med3d_turbo.pth"}, "trainable_state_dict": trained},
               tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"sam3d train merge .*best\.pt -o MERGED\.pt") as err:
        load_checkpoint(tmp_path / "best.pt")
    assert "adapter3d" in str(err.value) and "sam_med3d_turbo.pth" in str(err.value)
    enc = {k[len("image_encoder."):]: v for k, v in tiny.state_dict().items() if k.startswith("image_encoder.")}
    torch.save({"format": "sam3dsegment-image-encoder/1", "config": tiny.config.to_dict(),
                "image_encoder_state_dict": enc}, tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match="image encoder alone"):
        load_checkpoint(tmp_path / "enc.pt")


def test_untrusted_pickle_is_refused_then_loaded_when_trusted(tiny, tmp_path, caplog):
    torch.save({"model_state_dict": tiny.state_dict(), "extra": NotAllowed()}, tmp_path / "custom.pth")
    with pytest.raises(CheckpointError, match=r"NotAllowed.*load_checkpoint\(PATH, trusted=True\)"):
        load_checkpoint(tmp_path / "custom.pth", config=SamMed3DConfig.tiny())
    with caplog.at_level(logging.WARNING):
        loaded = load_checkpoint(tmp_path / "custom.pth", config=SamMed3DConfig.tiny(), trusted=True)
    assert _same_weights(tiny, loaded)
    assert any("weights_only=False" in r.getMessage() for r in caplog.records)


def test_published_file_without_config_builds_vit_b_ori(tmp_path):
    model = build_sam_med3d()
    torch.save({"model_state_dict": model.state_dict(), "args": argparse.Namespace()}, tmp_path / "turbo_like.pth")
    del model
    loaded = load_checkpoint(tmp_path / "turbo_like.pth")
    assert loaded.config.name == "vit_b_ori"
    assert sum(p.numel() for p in loaded.parameters()) == 100_509_232


def test_device_and_precision_choices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="only supported on a GPU"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_dtype("int8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_local_backend_round_trip(tiny):
    backend = LocalBackend(tiny, device="cpu")
    assert "cpu" in backend.name and "float32" in backend.name
    image = np.random.default_rng(0).standard_normal((128, 128, 128)).astype(np.float32)
    emb = backend.encode(image)
    first = backend.decode(emb, np.array([[64.0, 64.0, 64.0]]), np.array([1]), None)
    assert first.shape == (32, 32, 32) and first.dtype == np.float32
    second = backend.decode(emb, np.array([[10.0, 64.0, 64.0]]), np.array([0]), first)
    with torch.inference_mode():
        expected = tiny.predict_low_res(emb, torch.tensor([[[10.0, 64.0, 64.0]]]), torch.tensor([[0]]),
                                        torch.from_numpy(first)[None, None])
    np.testing.assert_allclose(second, expected[0, 0].numpy(), atol=1e-6)


@pytest.mark.parametrize("opt_out, expected", [("", "True"), ("1", "False")])
def test_cpu_allocator_tuning_is_applied_once_and_can_be_switched_off(opt_out, expected):
    import subprocess
    import sys

    code = ("from SAM3DSegmentLib.models.device import tune_cpu_allocator as t; "
            "import sys; print(t() if sys.platform.startswith('linux') else 'False', t())")
    env = dict(__import__("os").environ, SAM3D_NO_MALLOC_TUNING=opt_out)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    first, second = out.stdout.split()
    assert first == second  # cached: the process-wide setting is applied at most once
    if sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc":
        assert first == expected
