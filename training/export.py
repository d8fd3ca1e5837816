"""Export backbones into the model repository (docs/models.md).

* ``export_open_clip``: any open_clip architecture, random, a pretrained tag
  or a local checkpoint -> image + text towers, tokenizer, manifest.
* ``export_image_backbone``: one of our own torch image encoders -> image
  tower + manifest.

Every export writes into a temporary folder, checks onnxruntime against
torch on a fixed batch (cosine >= ``min_cosine`` per embedding) and only
then moves the folder into place: a failed export leaves nothing behind.

``int8`` (open_clip towers): the MatMul weights are quantized to int8 after
export (onnxruntime dynamic quantization: int8 weights per output channel,
activations quantized per batch at run time); inputs and outputs stay float32.
About 2x the images/s of the float32 tower on this CPU; the parity threshold is
then ``INT8_MIN_COSINE`` against the float32 torch model.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server import __version__
from server.model_repo import (
    MANIFEST,
    Manifest,
    ModelFolder,
    Provenance,
    Scoring,
    TokenizerSpec,
    TowerSpec,
    load_model,
    sha256_file,
    triton_config,
)
from server.runtimes.base import IMAGE_INPUT, OUTPUT, TEXT_INPUT

DEFAULT_OPSET = 18
MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.999
PARITY_SAMPLES = 4
PARITY_TEXTS = [
    "a photo of a cat.",
    "",
    "A diagram of the Omniglot alphabet, character 12 ✏️",
    "ünïcödé and 汉字 and emoji 🐈‍⬛ " * 6,
]


class ExportError(RuntimeError):
    """The export failed (parity check included); nothing was written."""


class _Tower(torch.nn.Module):
    """One tower of a model as its own module: ``model.<method>(x, **kwargs)`` in float32."""

    def __init__(self, model: torch.nn.Module, method: str, **kwargs: Any) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.method = method
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = getattr(self.model, self.method)(x, **self.kwargs)
        return out.float()


def _export_tower(
    module: torch.nn.Module,
    example: torch.Tensor,
    input_name: str,
    path: Path,
    opset: int,
    fp16: bool,
    fuse: str | None = None,
    int8: bool = False,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # nn.MultiheadAttention's fused inference fast path has no ONNX export.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=[OUTPUT],
                dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if fuse is not None:
        _fuse(path, fuse)
    if fp16:  # fp16 weights, float32 inputs and outputs
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        half = OnnxModel(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True))
        half.topological_sort()  # the converter can leave the graph unsorted
        onnx.save(half.model, str(path))
    if int8:
        _quantize_int8(path)


def _quantize_int8(path: Path) -> None:
    """onnxruntime dynamic quantization of the MatMul weights (per channel), in place."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    out = path.with_suffix(".int8.onnx")
    quantize_dynamic(
        str(path),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        # fused graphs hold contrib ops that ONNX shape inference cannot type
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    out.replace(path)


def _precision(fp16: bool, int8: bool) -> str:
    if fp16 and int8:
        raise ExportError("choose fp16 or int8, not both")
    return "fp16" if fp16 else "int8" if int8 else "fp32"


# Runs the exported tower in a child process: an onnxruntime crash (seen:
# onnxruntime 1.32's CPU provider segfaults on fp16 ViT graphs on an
# AVX512-FP16 CPU) must fail the export with a message, not kill the caller.
_ORT_CHILD = """
import sys, numpy as np, onnxruntime as ort
model, inp, out, src, dst = sys.argv[1:6]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
np.save(dst, sess.run([out], {inp: np.load(src)})[0])
"""


def _run_onnx_isolated(path: Path, input_name: str, batch: np.ndarray, what: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as t:
        src, dst = Path(t) / "in.npy", Path(t) / "out.npy"
        np.save(src, batch)
        proc = subprocess.run(
            [sys.executable, "-c", _ORT_CHILD, str(path), input_name, OUTPUT, str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            how = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else "failed"
            raise ExportError(
                f"{what}: onnxruntime {how} running the exported tower: "
                f"{proc.stderr.strip()[-500:] or 'no message'}"
            )
        return np.load(dst)


def _fuse(path: Path, model_type: str) -> None:
    """onnxruntime's transformer fusions (LayerNorm, BiasGelu, ...), graph level only.

    Measured on ViT-B-32 here: about 2.5x the images/s of the plain export on
    onnxruntime's CPU provider. The fused ops are onnxruntime contrib ops,
    which Triton's onnxruntime backend runs as well.
    """
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = optimize_model(str(path), model_type=model_type, opt_level=0)
    model.save_model_to_file(str(path))


def _parity(
    path: Path,
    module: torch.nn.Module,
    batch: torch.Tensor,
    input_name: str,
    min_cosine: float,
    what: str,
) -> float:
    with torch.no_grad():
        ref = module(batch).float().numpy()
    got = _run_onnx_isolated(path, input_name, batch.numpy(), what)
    if got.shape != ref.shape:
        raise ExportError(f"{what}: onnxruntime gave shape {got.shape}, torch {ref.shape}")
    num = (got * ref).sum(1)
    den = np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12
    worst = float((num / den).min())
    if not worst >= min_cosine:
        raise ExportError(
            f"{what}: parity check failed, onnxruntime vs torch cosine {worst:.6f} < {min_cosine}"
        )
    return worst


def _write_folder(
    tmp: Path, manifest: Manifest, channels: int, size: tuple[int, int], context_length: int
) -> None:
    for tower in manifest.towers:
        (tmp / tower / "config.pbtxt").write_text(
            triton_config(
                tower,
                channels=channels,
                size=size,
                context_length=context_length,
                dim=manifest.embedding_dim,
            )
        )
    (tmp / MANIFEST).write_text(manifest.to_json())


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> ModelFolder:
    if out_dir.exists():
        if not overwrite:
            raise ExportError(f"{out_dir} exists (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), str(out_dir))
    return load_model(out_dir)


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def export_open_clip(
    arch: str,
    out_dir: str | Path,
    *,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    name: str | None = None,
    fp16: bool = False,
    int8: bool = False,
    fuse: bool = True,
    opset: int = DEFAULT_OPSET,
    min_cosine: float | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> ModelFolder:
    """Exports an open_clip model's image and text towers with its tokenizer.

    ``fuse`` applies onnxruntime's transformer fusions to both towers; ``int8``
    quantizes their MatMul weights. ``min_cosine`` defaults to ``MIN_COSINE``
    (``INT8_MIN_COSINE`` with ``int8``).
    """
    precision = _precision(fp16, int8)
    if min_cosine is None:
        min_cosine = INT8_MIN_COSINE if int8 else MIN_COSINE
    import open_clip
    from open_clip.tokenizer import default_bpe

    from server.imaging import PreprocessConfig

    out_dir = Path(out_dir)
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    if checkpoint is not None:
        open_clip.load_checkpoint(model, str(checkpoint))
    model.eval()
    pre = PreprocessConfig.from_open_clip(open_clip.get_model_preprocess_cfg(model))
    tokenizer = open_clip.get_tokenizer(arch)
    context_length = int(getattr(tokenizer, "context_length", 77))
    vocab_src = Path(default_bpe())

    gen = torch.Generator().manual_seed(seed)
    channels = 1 if pre.channels == "L" else 3
    pixels = torch.randn(PARITY_SAMPLES, channels, *pre.size, generator=gen)
    tokens = tokenizer(PARITY_TEXTS).to(torch.int64)
    image = _Tower(model, "encode_image", normalize=False).eval()
    text = _Tower(model, "encode_text", normalize=False).eval()
    dim = int(image(pixels[:1]).shape[1])

    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as t:
        tmp = Path(t) / "model"
        towers: dict[str, TowerSpec] = {}
        for tower, module, example, input_name in (
            ("image", image, pixels, IMAGE_INPUT),
            ("text", text, tokens, TEXT_INPUT),
        ):
            rel = f"{tower}/1/model.onnx"
            fusion = ("vit" if tower == "image" else "clip") if fuse else None
            _export_tower(module, example, input_name, tmp / rel, opset, fp16, fusion, int8)
            _parity(tmp / rel, module, example, input_name, min_cosine, f"{arch}/{tower}")
            towers[tower] = TowerSpec(
                onnx=rel,
                sha256=sha256_file(tmp / rel),
                input=input_name,
                precision=precision,
            )
        vocab_rel = f"tokenizer/{vocab_src.name}"
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(vocab_src, tmp / vocab_rel)
        manifest = Manifest(
            name=name or out_dir.name,
            embedding_dim=dim,
            towers=towers,
            preprocess=_json_ready(pre.to_dict()),
            scoring=Scoring(metric="cosine", logit_scale=float(model.logit_scale.exp().item())),
            provenance=Provenance(
                source="open_clip",
                architecture=arch,
                pretrained=pretrained,
                checkpoint=str(checkpoint) if checkpoint is not None else None,
                exported_at=_now(),
                exporter=f"protoserve {__version__}",
            ),
            tokenizer=TokenizerSpec(
                kind="clip-bpe",
                vocab=vocab_rel,
                sha256=sha256_file(tmp / vocab_rel),
                context_length=context_length,
            ),
        )
        _write_folder(tmp, manifest, channels, pre.size, context_length)
        return _move_into_place(tmp, out_dir, overwrite)


def export_image_backbone(
    module: torch.nn.Module,
    out_dir: str | Path,
    *,
    preprocess: dict[str, Any],
    architecture: str,
    recipe: str,
    name: str | None = None,
    metric: str = "cosine",
    logit_scale: float = 10.0,
    checkpoint: str | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    min_cosine: float = MIN_COSINE,
    overwrite: bool = False,
    seed: int = 0,
) -> ModelFolder:
    """Exports one of our own image encoders (float32 [N,C,H,W] -> [N,D])."""
    from server.imaging import PreprocessConfig

    out_dir = Path(out_dir)
    pre = PreprocessConfig.from_dict(preprocess)
    channels = 1 if pre.channels == "L" else 3
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(PARITY_SAMPLES, channels, *pre.size, generator=gen)
    image = _Tower(module, "forward").eval()
    with torch.no_grad():
        dim = int(image(pixels[:1]).shape[1])
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as t:
        tmp = Path(t) / "model"
        rel = "image/1/model.onnx"
        _export_tower(image, pixels, IMAGE_INPUT, tmp / rel, opset, fp16)
        _parity(tmp / rel, image, pixels, IMAGE_INPUT, min_cosine, f"{architecture}/image")
        manifest = Manifest(
            name=name or out_dir.name,
            embedding_dim=dim,
            towers={
                "image": TowerSpec(
                    onnx=rel,
                    sha256=sha256_file(tmp / rel),
                    input=IMAGE_INPUT,
                    precision="fp16" if fp16 else "fp32",
                )
            },
            preprocess=_json_ready(pre.to_dict()),
            scoring=Scoring(metric=metric, logit_scale=logit_scale),
            provenance=Provenance(
                source="protoserve.training",
                architecture=architecture,
                checkpoint=checkpoint,
                recipe=recipe,
                exported_at=_now(),
                exporter=f"protoserve {__version__}",
            ),
        )
        _write_folder(tmp, manifest, channels, pre.size, context_length=0)
        return _move_into_place(tmp, out_dir, overwrite)


def _json_ready(d: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(d)))
