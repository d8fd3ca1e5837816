"""Batch offline scoring: ``protoserve score`` (issue 7, "Batch offline scoring").

Classifies every image of a folder tree or a manifest (CSV / JSONL with a ``path`` column)
against a collection, through a server (``--server``) or an in-process ``Pipeline``
(``--in-process``), and writes one row per image to JSONL, CSV or Parquet (by the output's
extension). The input is streamed and at most ``concurrency * 2`` batches are in flight, so
memory stays bounded on any input size. Through a server, the calls go round ``concurrency``
connections, so a multi-process server (``serve --processes N``) spreads them over its workers.

Resumable: rows are appended as whole records, flushed and fsynced per batch, in input order;
on start a trailing partial line (a crash mid-write) is dropped and the rows already present
are skipped. A broken image is a row with ``error`` set, never a failed job.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from server.client import DEFAULT_TARGET, ProtoserveClient, ProtoserveError
from server.local import local_pipeline, service_error_rc
from server.parquet_io import jsonl_to_parquet, parquet_to_jsonl, require_pyarrow

__all__ = [
    "IMAGE_EXTENSIONS",
    "ScoreError",
    "add_score_command",
    "iter_inputs",
    "score",
]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
CSV_FIELDS = (
    "path",
    "label",
    "labels",
    "scores",
    "probabilities",
    "entropy",
    "margin",
    "unknown",
    "error",
)

Row = dict[str, Any]
Classify = Callable[[list[bytes]], list[Any]]


class ScoreError(Exception):
    """A job-level failure (bad arguments, unreadable manifest, no pyarrow for .parquet)."""


class _ImageError(Exception):
    """One image of a request could not be decoded (the backend's per-image error)."""


# -- input --------------------------------------------------------------------------------------
def iter_inputs(source: str | os.PathLike[str]) -> Iterator[tuple[str, Path]]:
    """(key, file) per image, lazily: a folder tree (recursive, sorted) or a manifest."""
    src = Path(source)
    if src.is_dir():
        yield from _iter_folder(src)
    elif src.suffix.lower() == ".csv":
        yield from _iter_csv(src)
    elif src.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(src)
    elif not src.exists():
        raise ScoreError(f"input {src} does not exist")
    else:
        raise ScoreError(f"input {src}: not a folder, .csv or .jsonl manifest")


def _iter_folder(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                p = Path(dirpath) / name
                yield str(p), p


def _resolve(manifest: Path, value: str) -> tuple[str, Path]:
    p = Path(value)
    return value, p if p.is_absolute() else manifest.parent / p


def _iter_csv(manifest: Path) -> Iterator[tuple[str, Path]]:
    with manifest.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ScoreError(f"manifest {manifest}: no 'path' column")
        for row in reader:
            if row.get("path"):
                yield _resolve(manifest, row["path"])


def _iter_jsonl(manifest: Path) -> Iterator[tuple[str, Path]]:
    with manifest.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                value = obj["path"]
            except (ValueError, KeyError, TypeError) as e:
                raise ScoreError(f"manifest {manifest} line {n}: no 'path' ({e})") from None
            yield _resolve(manifest, str(value))


def _count(source: str | os.PathLike[str]) -> int | None:
    """The number of inputs for the progress bar's ETA (a streaming pass), or None."""
    try:
        return sum(1 for _ in iter_inputs(source))
    except (OSError, ScoreError):
        return None


# -- output -------------------------------------------------------------------------------------
def _fmt(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def result_row(key: str, r: Any) -> Row:
    """One output row from a client or pipeline ``ImageResult``."""
    preds = r.predictions
    return {
        "path": key,
        "label": preds[0].label if preds else None,
        "labels": [p.label for p in preds],
        "scores": [_fmt(p.score) for p in preds],
        "probabilities": [_fmt(p.probability) for p in preds],
        "entropy": _fmt(r.entropy),
        "margin": _fmt(r.margin),
        "unknown": bool(r.unknown),
        "error": None,
    }


def error_row(key: str, message: str) -> Row:
    return {
        "path": key,
        "label": None,
        "labels": [],
        "scores": [],
        "probabilities": [],
        "entropy": None,
        "margin": None,
        "unknown": False,
        "error": " ".join(message.split()),  # one line: a record never spans lines
    }


def _drop_partial_tail(path: Path) -> None:
    """Truncates ``path`` after its last newline (a crash mid-record leaves a partial line)."""
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                pos = pos - step + nl + 1
                break
            pos -= step
        if pos != size:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)
        os.fsync(f.fileno())


class _Writer:
    """Appends whole records (JSONL or CSV), flush + fsync per batch; knows the done keys."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.csv = path.suffix.lower() == ".csv"
        self.done: set[str] = set()
        if path.exists():
            _drop_partial_tail(path)
            self._load_done()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] = path.open("a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._f, CSV_FIELDS) if self.csv else None
        if self._csv is not None and self._f.tell() == 0:
            self._csv.writeheader()
            self._sync()

    def _load_done(self) -> None:
        """Reads the keys already written; a corrupt record and all after it are dropped."""
        good = 0
        with self.path.open("rb") as f:
            for n, raw in enumerate(f):
                try:
                    line = raw.decode("utf-8")
                    if self.csv:
                        if n == 0:
                            if next(csv.reader([line])) != list(CSV_FIELDS):
                                raise ValueError("not this command's header")
                            good += len(raw)
                            continue
                        fields = next(csv.reader([line]))
                        if len(fields) != len(CSV_FIELDS):
                            raise ValueError("wrong number of fields")
                        key = fields[0]
                    else:
                        key = str(json.loads(line)["path"])
                except (ValueError, KeyError, TypeError, StopIteration):
                    if self.csv and n == 0:
                        raise ScoreError(
                            f"output {self.path} exists and is not a score CSV"
                        ) from None
                    break
                self.done.add(key)
                good += len(raw)
        if good != self.path.stat().st_size:
            _truncate(self.path, good)

    def write(self, rows: Sequence[Row]) -> None:
        for row in rows:
            if self._csv is not None:
                out = dict(row)
                for k in ("labels", "scores", "probabilities"):
                    out[k] = json.dumps(row[k])
                out["error"] = row["error"] or ""
                self._csv.writerow(out)
            else:
                self._f.write(json.dumps(row) + "\n")
        self._sync()

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# -- scoring ------------------------------------------------------------------------------------
def _server_classify(
    clients: Sequence[ProtoserveClient], collection: str, top_k: int | None
) -> Classify:
    """Calls go round the ``clients`` (one connection each: a multi-process server spreads
    connections over its workers)."""
    turn = itertools.count()

    def classify(images: list[bytes]) -> list[Any]:
        client = clients[next(turn) % len(clients)]  # count's next is atomic under the GIL
        try:
            return client.classify(collection, images, top_k=top_k)
        except ProtoserveError as e:
            if e.code == "INVALID_ARGUMENT" and e.message.startswith("image "):
                raise _ImageError(e.message) from None
            raise

    return classify


def _pipeline_classify(pipeline: Any, collection: str, top_k: int | None) -> Classify:
    from server.imaging import ImageDecodeError

    def classify(images: list[bytes]) -> list[Any]:
        try:
            results: list[Any] = pipeline.classify(collection, images, top_k or 0)
            return results
        except ImageDecodeError as e:
            raise _ImageError(str(e)) from None

    return classify


def _score_batch(classify: Classify, batch: list[tuple[str, Path]]) -> list[Row]:
    """Rows for ``batch``, in order; unreadable or undecodable images become error rows."""
    rows: list[Row | None] = [None] * len(batch)
    data: list[bytes] = []
    at: list[int] = []
    for i, (key, path) in enumerate(batch):
        try:
            data.append(path.read_bytes())
            at.append(i)
        except OSError as e:
            rows[i] = error_row(key, f"cannot read image {path}: {e.strerror or e}")
    if data:
        try:
            for i, r in zip(at, classify(data), strict=True):
                rows[i] = result_row(batch[i][0], r)
        except _ImageError:  # some image is broken: score one by one to find which
            for i, d in zip(at, data, strict=True):
                key = batch[i][0]
                try:
                    (r,) = classify([d])
                    rows[i] = result_row(key, r)
                except _ImageError as e:
                    rows[i] = error_row(key, str(e).removeprefix("image 0: "))
    return [r for r in rows if r is not None]


def _batches(
    items: Iterator[tuple[str, Path]], done: set[str], n: int
) -> Iterator[list[tuple[str, Path]]]:
    """Batches of ``n`` inputs whose keys are not in ``done``. Each key yielded joins ``done``,
    so a key listed twice in a manifest is scored once, with one set of keys in memory."""
    batch: list[tuple[str, Path]] = []
    for key, path in items:
        if key in done:
            continue
        done.add(key)
        batch.append((key, path))
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def score(
    classify: Classify,
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    concurrency: int = 4,
    progress: bool = True,
) -> dict[str, int]:
    """Scores ``source`` into ``output``; returns counts (scored, errors, skipped)."""
    if batch_size < 1 or concurrency < 1:
        raise ScoreError("--batch and --concurrency must be positive")
    out = Path(output)
    ext = out.suffix.lower()
    if ext not in (".jsonl", ".csv", ".parquet"):
        raise ScoreError(f"output {out}: extension must be .jsonl, .csv or .parquet")
    sidecar = out.with_name(out.name + ".partial.jsonl") if ext == ".parquet" else out
    if ext == ".parquet":
        require_pyarrow(ScoreError)
        if out.exists() and not sidecar.exists():
            parquet_to_jsonl(out, sidecar)  # resume: rows of a finished Parquet are done
    items = iter_inputs(source)  # raises ScoreError for a bad input before anything runs
    writer = _Writer(sidecar)
    counts = {"scored": 0, "errors": 0, "skipped": len(writer.done)}  # before _batches adds
    from tqdm import tqdm

    total = _count(source) if progress else None
    bar = tqdm(
        total=total,
        initial=len(writer.done) if total is not None else 0,
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    try:
        with ThreadPoolExecutor(concurrency, thread_name_prefix="score") as pool:
            inflight: deque[Future[list[Row]]] = deque()

            def drain_one() -> None:
                rows = inflight.popleft().result()
                writer.write(rows)
                errs = sum(1 for r in rows if r["error"])
                counts["errors"] += errs
                counts["scored"] += len(rows) - errs
                bar.update(len(rows))

            for batch in _batches(items, writer.done, batch_size):
                inflight.append(pool.submit(_score_batch, classify, batch))
                while len(inflight) >= 2 * concurrency:
                    drain_one()
            while inflight:
                drain_one()
    finally:
        bar.close()
        writer.close()
    if ext == ".parquet":
        jsonl_to_parquet(sidecar, out)
        sidecar.unlink()
    return counts


# -- CLI ----------------------------------------------------------------------------------------
def _command(args: argparse.Namespace) -> int:
    top_k = args.top_k
    try:
        if args.in_process:
            if not args.data_dir or not args.model_repo:
                print(
                    "protoserve score: --in-process needs --data-dir and --model-repo",
                    file=sys.stderr,
                )
                return 2
            with local_pipeline(args.data_dir, args.model_repo) as pipeline:
                counts = score(
                    _pipeline_classify(pipeline, args.collection, top_k),
                    args.input,
                    args.output,
                    batch_size=args.batch,
                    concurrency=args.concurrency,
                    progress=not args.no_progress,
                )
        else:
            with ExitStack() as stack:
                clients = [
                    stack.enter_context(ProtoserveClient(args.server, timeout_s=args.timeout))
                    for _ in range(max(1, args.concurrency))
                ]
                counts = score(
                    _server_classify(clients, args.collection, top_k),
                    args.input,
                    args.output,
                    batch_size=args.batch,
                    concurrency=args.concurrency,
                    progress=not args.no_progress,
                )
    except ScoreError as e:
        print(f"protoserve score: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        rc = service_error_rc("protoserve score", e)
        if rc is None:
            raise
        return rc
    print(
        f"scored {counts['scored']}, errors {counts['errors']}, "
        f"skipped {counts['skipped']} (already in {args.output})",
        file=sys.stderr,
    )
    return 0


def add_score_command(sub: Any) -> None:
    """Adds ``score`` to ``protoserve``'s subparsers."""
    p = sub.add_parser("score", help="batch offline scoring of a folder or manifest to a file")
    p.add_argument("--collection", required=True)
    p.add_argument(
        "--input", required=True, metavar="DIR_OR_MANIFEST", help="a folder or a .csv/.jsonl"
    )
    p.add_argument("--output", required=True, metavar="FILE", help=".jsonl, .csv or .parquet")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=DEFAULT_TARGET, metavar="HOST:PORT")
    where.add_argument(
        "--in-process", action="store_true", help="run the pipeline here (no server)"
    )
    p.add_argument("--data-dir", help="with --in-process: the registry's folder")
    p.add_argument("--model-repo", help="with --in-process: the model repository")
    p.add_argument("--top-k", type=int, help="predictions per image (default 5)")
    p.add_argument("--batch", type=int, default=32, help="images per request (default 32)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests (default 4)")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="deadline per call, seconds (default 60)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_command)
