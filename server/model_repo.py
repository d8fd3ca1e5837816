"""The model repository: one folder per model, servable by Triton unchanged.

    <repo>/<model>/protoserve.json          the manifest (this module's schema)
    <repo>/<model>/image/config.pbtxt       Triton config of the image tower
    <repo>/<model>/image/1/model.onnx
    <repo>/<model>/text/config.pbtxt        optional text tower
    <repo>/<model>/text/1/model.onnx
    <repo>/<model>/tokenizer/...            tokenizer files (text models)

``load_model`` validates the manifest and every checksum and refuses a broken
folder with a ``ModelRepoError`` naming the problem. docs/models.md documents
the format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.runtimes.base import IMAGE_INPUT, OUTPUT, TEXT_INPUT

FORMAT_VERSION = 1
MANIFEST = "protoserve.json"
TOWERS = ("image", "text")
# Tower weights: float32, float16, or float32 with int8-quantized MatMul weights.
PRECISIONS = ("fp32", "fp16", "int8")
METRICS = ("cosine", "ip", "l2")


class ModelRepoError(ValueError):
    """A model folder or its manifest is broken; the message says where and how."""


@dataclass(frozen=True)
class TowerSpec:
    onnx: str  # relative to the model folder
    sha256: str
    input: str
    output: str = OUTPUT
    precision: str = "fp32"  # one of PRECISIONS (inputs and outputs are float32 in all)


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "clip-bpe"
    vocab: str  # relative path of the BPE vocabulary file
    sha256: str
    context_length: int = 77


@dataclass(frozen=True)
class Scoring:
    metric: str = "cosine"
    logit_scale: float = 100.0


@dataclass(frozen=True)
class Provenance:
    source: str  # "open_clip" | "protoserve.training"
    architecture: str
    pretrained: str | None = None
    checkpoint: str | None = None
    recipe: str | None = None
    exported_at: str = ""
    exporter: str = ""


@dataclass(frozen=True)
class Manifest:
    name: str
    embedding_dim: int
    towers: dict[str, TowerSpec]
    preprocess: dict[str, Any]
    scoring: Scoring
    provenance: Provenance
    tokenizer: TokenizerSpec | None = None
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        if self.tokenizer is None:
            data.pop("tokenizer")
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class ModelFolder:
    """A validated model folder."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    def tower_path(self, tower: str) -> Path:
        return self.path / self.manifest.towers[tower].onnx

    @property
    def has_text(self) -> bool:
        return "text" in self.manifest.towers

    @property
    def vocab_path(self) -> Path | None:
        tok = self.manifest.tokenizer
        return self.path / tok.vocab if tok else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ModelRepoError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ModelRepoError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def parse_manifest(data: Any, where: str = MANIFEST) -> Manifest:
    """Validates the manifest's structure (not the files it names)."""
    if not isinstance(data, dict):
        raise ModelRepoError(f"{where}: the manifest must be a JSON object")
    fmt = _require(data, "format", int, where)
    if fmt != FORMAT_VERSION:
        raise ModelRepoError(
            f"{where}: format {fmt} is not supported (this server reads {FORMAT_VERSION})"
        )
    name = _require(data, "name", str, where)
    dim = _require(data, "embedding_dim", int, where)
    if dim <= 0:
        raise ModelRepoError(f"{where}: embedding_dim must be positive, got {dim}")
    towers_raw = _require(data, "towers", dict, where)
    if "image" not in towers_raw:
        raise ModelRepoError(f"{where}: the model has no image tower")
    towers: dict[str, TowerSpec] = {}
    for tower, spec in towers_raw.items():
        if tower not in TOWERS:
            raise ModelRepoError(f"{where}: unknown tower {tower!r} (expected {TOWERS})")
        w = f"{where}: towers.{tower}"
        if not isinstance(spec, dict):
            raise ModelRepoError(f"{w} must be an object")
        towers[tower] = TowerSpec(
            onnx=_require(spec, "onnx", str, w),
            sha256=_require(spec, "sha256", str, w),
            input=spec.get("input", IMAGE_INPUT if tower == "image" else TEXT_INPUT),
            output=spec.get("output", OUTPUT),
            precision=spec.get("precision", "fp32"),
        )
        if towers[tower].precision not in PRECISIONS:
            raise ModelRepoError(f"{w}.precision must be one of {', '.join(PRECISIONS)}")
    preprocess = _require(data, "preprocess", dict, where)
    tokenizer = None
    if "text" in towers:
        tw = f"{where}: tokenizer"
        tok = _require(data, "tokenizer", dict, where)
        tokenizer = TokenizerSpec(
            kind=_require(tok, "kind", str, tw),
            vocab=_require(tok, "vocab", str, tw),
            sha256=_require(tok, "sha256", str, tw),
            context_length=int(tok.get("context_length", 77)),
        )
        if tokenizer.kind != "clip-bpe":
            raise ModelRepoError(f"{tw}.kind {tokenizer.kind!r} is not supported (clip-bpe)")
    sc = data.get("scoring", {})
    scoring = Scoring(
        metric=sc.get("metric", "cosine"), logit_scale=float(sc.get("logit_scale", 100.0))
    )
    if scoring.metric not in METRICS:
        raise ModelRepoError(f"{where}: scoring.metric must be one of {METRICS}")
    prov = _require(data, "provenance", dict, where)
    pw = f"{where}: provenance"
    provenance = Provenance(
        source=_require(prov, "source", str, pw),
        architecture=_require(prov, "architecture", str, pw),
        pretrained=prov.get("pretrained"),
        checkpoint=prov.get("checkpoint"),
        recipe=prov.get("recipe"),
        exported_at=prov.get("exported_at", ""),
        exporter=prov.get("exporter", ""),
    )
    return Manifest(
        name=name,
        embedding_dim=dim,
        towers=towers,
        preprocess=preprocess,
        scoring=scoring,
        provenance=provenance,
        tokenizer=tokenizer,
        format=fmt,
        extra=data.get("extra", {}),
    )


def _inside(folder: Path, rel: str, what: str) -> Path:
    path = (folder / rel).resolve()
    if folder.resolve() not in path.parents:
        raise ModelRepoError(f"{folder}: {what} path {rel!r} leaves the model folder")
    if not path.is_file():
        raise ModelRepoError(f"{folder}: {what} file {rel} is missing")
    return path


def load_model(folder: str | Path, *, verify_checksums: bool = True) -> ModelFolder:
    """Reads and validates ``folder``; raises ModelRepoError naming what is wrong."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ModelRepoError(f"{folder}: no {MANIFEST} (not a protoserve model folder)")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelRepoError(f"{mpath}: not valid JSON ({e})") from e
    manifest = parse_manifest(data, str(mpath))
    for tower, spec in manifest.towers.items():
        onnx = _inside(folder, spec.onnx, f"{tower} tower")
        if not (folder / tower / "config.pbtxt").is_file():
            raise ModelRepoError(f"{folder}: {tower}/config.pbtxt is missing (Triton layout)")
        if verify_checksums and sha256_file(onnx) != spec.sha256:
            raise ModelRepoError(f"{folder}: {spec.onnx} does not match its sha256 in {MANIFEST}")
    if manifest.tokenizer is not None:
        vocab = _inside(folder, manifest.tokenizer.vocab, "tokenizer")
        if verify_checksums and sha256_file(vocab) != manifest.tokenizer.sha256:
            raise ModelRepoError(f"{folder}: {manifest.tokenizer.vocab} does not match its sha256")
    return ModelFolder(folder, manifest)


class ModelRepository:
    """A folder of model folders; models are validated when first asked for."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelRepoError(f"model repository {self.root} is not a directory")
        self._cache: dict[str, ModelFolder] = {}

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def get(self, name: str) -> ModelFolder:
        if name not in self._cache:
            folder = self.root / name
            if "/" in name or name.startswith(".") or not (folder / MANIFEST).is_file():
                raise KeyError(
                    f"no model {name!r} in {self.root} (have: {', '.join(self.names())})"
                )
            self._cache[name] = load_model(folder)
        return self._cache[name]


def triton_config(
    tower: str,
    *,
    channels: int,
    size: tuple[int, int],
    context_length: int,
    dim: int,
    max_batch_size: int = 64,
    fp16: bool = False,
) -> str:
    """config.pbtxt for one tower served by Triton's onnxruntime backend."""
    if tower == "image":
        inp, dtype, dims = IMAGE_INPUT, "TYPE_FP16" if fp16 else "TYPE_FP32", [channels, *size]
    else:
        inp, dtype, dims = TEXT_INPUT, "TYPE_INT64", [context_length]
    out_type = "TYPE_FP16" if fp16 else "TYPE_FP32"
    return (
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f'input [ {{ name: "{inp}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ] }} ]\n'
        f'output [ {{ name: "{OUTPUT}" data_type: {out_type} dims: [ {dim} ] }} ]\n'
        "dynamic_batching { }\n"
    )
