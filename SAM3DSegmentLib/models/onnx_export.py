"""Export the per-click half of a SAM-Med3D-family model (prompt encoder + mask decoder) to ONNX.

The exported graph computes exactly :meth:`SamMed3D.predict_low_res` for one region::

    embedding (1, C, g, g, g) float32, points (1, N, 3) float32, labels (1, N) int64,
    mask_logits (1, 1, s, s, s) float32  ->  logits (1, 1, s, s, s) float32

with N free (1 and more points). ``remote/onnx_decoder.py`` runs it with onnxruntime, so a workstation
decodes clicks without torch. The image encoder is not exported: it runs on the server.

The exporter is torch's TorchScript-based one (``dynamo=False``): it needs only the ``onnx`` package and
takes seconds. torch >= 2.9 marks it deprecated in favour of the ``torch.export`` exporter, which also
works here (``exporter="dynamo"``, needs the ``onnxscript`` package) but takes several times longer.
"""
from __future__ import annotations

import io
import warnings
from typing import Optional

import torch
from torch import nn

INPUT_NAMES = ("embedding", "points", "labels", "mask_logits")
OUTPUT_NAME = "logits"
OPSET = 17


class _Decoder(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, embedding, points, labels, mask_logits):
        return self.model.predict_low_res(embedding, points, labels, mask_logits)


def export_decoder_onnx(model, path: Optional[str] = None, exporter: str = "torchscript") -> bytes:
    """The ONNX bytes of ``model``'s prompt encoder + mask decoder (also written to ``path`` if given)."""
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    cfg = model.config
    g, s = cfg.grid_size, cfg.low_res_size
    dec = _Decoder(model).eval().to("cpu")
    example = (torch.zeros(1, cfg.prompt_embed_dim, g, g, g), torch.full((1, 2, 3), cfg.image_size / 2.0),
               torch.tensor([[1, 0]], dtype=torch.int64), torch.zeros(1, 1, s, s, s))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the result is checked by tests
        if exporter == "torchscript":
            torch.onnx.export(dec, example, buf, dynamo=False, opset_version=OPSET, input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={"points": {1: "n_points"}, "labels": {1: "n_points"}})
        else:
            n = torch.export.Dim("n_points", min=1, max=4096)
            program = torch.onnx.export(dec, example, dynamo=True, input_names=list(INPUT_NAMES),
                                        output_names=[OUTPUT_NAME], opset_version=max(OPSET, 18),
                                        dynamic_shapes={"embedding": None, "points": {1: n}, "labels": {1: n},
                                                        "mask_logits": None})
            program.save(buf)
    data = buf.getvalue()
    if path is not None:
        from ..core.atomic import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)

        atomic_write(path, write)
    return data
