"""Two-process DistributedDataParallel (gloo, CPU) equals one process on the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import tiny_config, write_config, write_nnunet_dataset  # noqa: E402

from SAM3DSegmentLib.train.config import config_from_dict  # noqa: E402
from SAM3DSegmentLib.train.loop import train  # noqa: E402
from SAM3DSegmentLib.train.model import build_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    data = write_nnunet_dataset(str(tmp_path / "data"))
    # AdamW with a large eps is (nearly) linear in the gradient, so the comparison is sensitive to the
    # gradient averaging itself rather than to Adam's normalisation of float-noise-sized gradients.
    common = dict(loop__epochs=1, val__every_epochs=0, optim={"lr": 0.05, "eps": 1.0, "weight_decay": 0.0},
                  loop__click_mode="random")
    single = tiny_config(data, str(tmp_path / "single"), loop__batch_size=2, **common)
    ddp = tiny_config(data, str(tmp_path / "ddp"), loop__batch_size=1, **common)
    res = train(config_from_dict(single), log=lambda *a: None)
    assert res["steps"] == 3
    path = write_config(str(tmp_path / "ddp.json"), ddp)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "SAM3DSegmentLib.train", path, "--nproc", "2"], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout
    a = torch.load(tmp_path / "single" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "latest.pt", weights_only=True)
    assert b["training"]["world_size"] == 2 and b["training"]["global_step"] == 3
    sa, sb = a["model_state_dict"], b["model_state_dict"]
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # and training really moved the weights (the comparison is not between two untouched models)
    torch.manual_seed(0)
    init, _, _ = build_model(config_from_dict(single), log=lambda *a: None)
    moved = max((sa[k].float() - v.float()).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 1e-3
