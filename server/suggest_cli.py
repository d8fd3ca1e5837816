"""``protoserve suggest``: the images a user should label next (issue 7, "Label suggestions").

``--input`` is a folder tree or a CSV/JSONL manifest (read as ``protoserve score`` reads them),
or a ``protoserve score`` output (JSONL/CSV/Parquet with its ``margin``/``entropy``/
``probabilities`` columns), which is ranked from those columns without running the model
(margin, entropy, least-confidence; ``diverse`` needs the images' embeddings). Images go to the
server (``--server``) or an in-process pipeline (``--in-process``) in chunks of ``--batch``,
at most ``2 * --concurrency`` chunks in flight, and ``server.suggest_merge`` merges the
answers in bounded memory. An image that cannot be read or decoded is skipped with a warning.

Output: one line per suggestion, best first (``--json``: one object per line), and with
``--output`` the same as ``.jsonl`` or ``.csv`` (written to a temporary file, then renamed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from server.client import (
    DEFAULT_TARGET,
    STRATEGIES,
    Prediction,
    ProtoserveClient,
    ProtoserveError,
    Suggestion,
    Suggestions,
)
from server.local import local_pipeline, service_error_rc
from server.scoring import ScoreError, iter_inputs
from server.suggest_merge import Diverse, Pick, TopUncertain, rank_columns

__all__ = ["OUTPUT_FIELDS", "add_suggest_command", "read_score_output"]

OUTPUT_FIELDS = ("rank", "path", "score", "label", "probability")
_SCORE_COLUMNS = frozenset({"path", "probabilities", "entropy", "margin"})

Call = Callable[[list[bytes]], Suggestions]
Chunk = list[tuple[int, str, Path]]  # (position in the input, key, file)


class SuggestError(Exception):
    """A job-level failure; ``rc`` is the exit status (2: the arguments, 1: the run)."""

    def __init__(self, message: str, rc: int = 2) -> None:
        super().__init__(message)
        self.rc = rc


class _BadImage(Exception):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


# -- backends: one chunk of encoded images -> Suggestions ---------------------------------------
def _client_call(client: ProtoserveClient, collection: str, strategy: str, budget: int) -> Call:
    def call(images: list[bytes]) -> Suggestions:
        try:
            if strategy == "diverse":
                return client.suggest(collection, images, 0, strategy=strategy, scores_only=True)
            return client.suggest(collection, images, min(budget, len(images)), strategy=strategy)
        except ProtoserveError as e:
            head = e.message.removeprefix("image ").split(":", 1)[0]
            if e.code == "INVALID_ARGUMENT" and e.message.startswith("image ") and head.isdigit():
                raise _BadImage(int(head), e.message) from None
            raise

    return call


def _as_client(s: Any) -> Suggestion:
    """A ``server.suggest.Suggestion`` (numpy arrays) as the client's (tuples)."""
    p = s.prediction
    return Suggestion(
        s.index,
        s.score,
        Prediction(p.label, p.score, p.probability),
        embedding=() if s.embedding is None else tuple(s.embedding.tolist()),
        nearest_support=() if s.nearest_support is None else tuple(s.nearest_support.tolist()),
        nearest_support_id=s.nearest_support_id,
        probabilities=() if s.probabilities is None else tuple(s.probabilities.tolist()),
    )


def _pipeline_call(pipeline: Any, collection: str, strategy: str, budget: int) -> Call:
    from server import suggest
    from server.imaging import ImageDecodeError

    def call(images: list[bytes]) -> Suggestions:
        try:
            if strategy == "diverse":
                scored = suggest.score_images(pipeline, collection, images, strategy)
                return Suggestions([_as_client(s) for s in scored.items], scored.labels)
            chosen = suggest.suggest(
                pipeline, collection, images, min(budget, len(images)), strategy
            )
            return Suggestions([_as_client(s) for s in chosen])
        except ImageDecodeError as e:
            raise _BadImage(e.index or 0, str(e)) from None

    return call


# -- images -------------------------------------------------------------------------------------
def _run_chunk(call: Call, chunk: Chunk) -> tuple[list[int], list[str], Suggestions, list[str]]:
    """(positions, keys, answer, warnings): unreadable or undecodable images are dropped."""
    warnings: list[str] = []
    entries: list[tuple[int, str, bytes]] = []
    for pos, key, path in chunk:
        try:
            entries.append((pos, key, path.read_bytes()))
        except OSError as e:
            warnings.append(f"skipped {key}: cannot read {path}: {e.strerror or e}")
    while entries:
        try:
            answer = call([d for _, _, d in entries])
        except _BadImage as e:
            if not 0 <= e.index < len(entries):
                raise
            _, key, _ = entries.pop(e.index)
            msg = str(e).split(":", 1)[-1].strip()
            warnings.append(f"skipped {key}: {msg}")
            continue
        return [p for p, _, _ in entries], [k for _, k, _ in entries], answer, warnings
    return [], [], Suggestions([]), warnings


def _chunks(source: str, size: int) -> Iterator[Chunk]:
    """Chunks of ``size`` distinct keys; a key listed again in a later chunk is left to the
    merge (``suggest_merge._Best``), so memory stays O(size), not O(input)."""
    chunk: Chunk = []
    keys: set[str] = set()
    for position, (key, path) in enumerate(iter_inputs(source)):
        if key in keys:
            continue
        keys.add(key)
        chunk.append((position, key, path))
        if len(chunk) >= size:
            yield chunk
            chunk, keys = [], set()
    if chunk:
        yield chunk


def suggest_images(
    call: Call,
    source: str,
    strategy: str,
    budget: int,
    *,
    seed: int = 0,
    batch: int = 32,
    concurrency: int = 4,
) -> tuple[list[Pick], int, int]:
    """(the picks best first, images ranked, images skipped) over a folder or manifest."""
    merger = Diverse(budget, seed) if strategy == "diverse" else TopUncertain(budget)
    counts = {"ranked": 0, "skipped": 0}
    with ThreadPoolExecutor(concurrency, thread_name_prefix="suggest") as pool:
        inflight: deque[Future[tuple[list[int], list[str], Suggestions, list[str]]]] = deque()

        def drain_one() -> None:
            positions, keys, answer, warnings = inflight.popleft().result()
            for w in warnings:
                print(f"protoserve suggest: {w}", file=sys.stderr)
            try:
                merger.add(positions, keys, answer)
            except ValueError as e:
                raise SuggestError(str(e), rc=1) from None
            counts["ranked"] += len(keys)
            counts["skipped"] += len(warnings)

        try:
            for chunk in _chunks(source, batch):
                inflight.append(pool.submit(_run_chunk, call, chunk))
                while len(inflight) >= 2 * concurrency:
                    drain_one()
            while inflight:
                drain_one()
        finally:
            for f in inflight:
                f.cancel()
    return merger.result(), counts["ranked"], counts["skipped"]


# -- a `protoserve score` output ----------------------------------------------------------------
def _csv_row(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for k in ("labels", "scores", "probabilities"):
        out[k] = json.loads(row[k]) if row.get(k) else []
    return out


def read_score_output(path: Path) -> Iterator[dict[str, Any]] | None:
    """The rows of a ``protoserve score`` output, or None when ``path`` is not one."""
    ext = path.suffix.lower()
    if not path.is_file() or ext not in (".jsonl", ".ndjson", ".csv", ".parquet"):
        return None
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SuggestError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from None
        pf = pq.ParquetFile(str(path))
        if not _SCORE_COLUMNS <= set(pf.schema_arrow.names):
            raise SuggestError(f"{path}: not a protoserve score output (columns)")
        return (r for b in pf.iter_batches(batch_size=4096) for r in b.to_pylist())
    with path.open(encoding="utf-8", newline="") as f:
        if ext == ".csv":
            header = next(csv.reader(f), [])
            if not _SCORE_COLUMNS <= set(header):
                return None
        else:
            first = next((line for line in f if line.strip()), "{}")
            try:
                keys = set(json.loads(first))
            except (ValueError, TypeError):
                return None
            if not _SCORE_COLUMNS <= keys:
                return None
    return _iter_score_rows(path)


def _iter_score_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            for row in csv.DictReader(f):
                yield _csv_row(row)
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError:
                raise SuggestError(f"{path} line {n}: not JSON", rc=1) from None


# -- output -------------------------------------------------------------------------------------
def _records(picks: list[Pick]) -> list[dict[str, Any]]:
    return [{"rank": r, **asdict(p)} for r, p in enumerate(picks, 1)]


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    ext = path.suffix.lower()
    if ext not in (".jsonl", ".csv"):
        raise SuggestError(f"--output {path}: extension must be .jsonl or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        if ext == ".csv":
            w = csv.DictWriter(f, OUTPUT_FIELDS)
            w.writeheader()
            w.writerows(records)
        else:
            f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _print(records: list[dict[str, Any]], as_json: bool) -> None:
    for r in records:
        if as_json:
            print(json.dumps(r))
        else:
            print(
                f"{r['rank']:>4}. {r['path']}  score {r['score']:.6f}  "
                f"{r['label']} ({r['probability']:.3f})"
            )


# -- CLI ----------------------------------------------------------------------------------------
def _rank(args: argparse.Namespace) -> tuple[list[Pick], int, int]:
    rows = read_score_output(Path(args.input))
    if rows is not None:  # ranked from the file's columns: no model, no server
        try:
            return rank_columns(rows, args.strategy, args.budget)
        except ValueError as e:
            raise SuggestError(f"--input {args.input}: {e}") from None
    kw = {"seed": args.seed, "batch": args.batch, "concurrency": args.concurrency}
    if not args.in_process:
        with ProtoserveClient(args.server, timeout_s=args.timeout) as client:
            call = _client_call(client, args.collection, args.strategy, args.budget)
            return suggest_images(call, args.input, args.strategy, args.budget, **kw)
    if not args.data_dir or not args.model_repo:
        raise SuggestError("--in-process needs --data-dir and --model-repo")
    with local_pipeline(args.data_dir, args.model_repo) as pipeline:
        call = _pipeline_call(pipeline, args.collection, args.strategy, args.budget)
        return suggest_images(call, args.input, args.strategy, args.budget, **kw)


def _command(args: argparse.Namespace) -> int:
    if args.budget < 1 or args.batch < 1 or args.concurrency < 1:
        print(
            "protoserve suggest: --budget, --batch and --concurrency must be positive",
            file=sys.stderr,
        )
        return 2
    try:
        if args.output and Path(args.output).suffix.lower() not in (".jsonl", ".csv"):
            raise SuggestError(f"--output {args.output}: extension must be .jsonl or .csv")
        picks, ranked, skipped = _rank(args)
        records = _records(picks)
        if args.output:
            _write(Path(args.output), records)
    except (SuggestError, ScoreError) as e:
        print(f"protoserve suggest: {e}", file=sys.stderr)
        return e.rc if isinstance(e, SuggestError) else 2
    except Exception as e:
        rc = service_error_rc("protoserve suggest", e)
        if rc is None:
            raise
        return rc
    _print(records, args.json)
    print(
        f"protoserve suggest: {len(picks)} of {ranked} images by {args.strategy}"
        + (f", {skipped} skipped" if skipped else ""),
        file=sys.stderr,
    )
    return 0


def add_suggest_command(sub: Any) -> None:
    """Adds ``suggest`` to ``protoserve``'s subparsers."""
    p = sub.add_parser("suggest", help="the images to label next (active learning)")
    p.add_argument("--collection", required=True)
    p.add_argument(
        "--input",
        required=True,
        metavar="DIR_OR_MANIFEST_OR_SCORES",
        help="a folder, a .csv/.jsonl manifest, or a `protoserve score` output",
    )
    p.add_argument("--budget", type=int, required=True, help="how many images to suggest")
    p.add_argument("--strategy", choices=STRATEGIES, default="margin", help="default: margin")
    p.add_argument("--seed", type=int, default=0, help="passed to training.active.select")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=DEFAULT_TARGET, metavar="HOST:PORT")
    where.add_argument(
        "--in-process", action="store_true", help="run the pipeline here (no server)"
    )
    p.add_argument("--data-dir", help="with --in-process: the registry's folder")
    p.add_argument("--model-repo", help="with --in-process: the model repository")
    p.add_argument("--batch", type=int, default=32, help="images per request (default 32)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests (default 4)")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="deadline per call, seconds (default 60)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--output", metavar="FILE", help="also write the list to .jsonl or .csv")
    p.set_defaults(func=_command)
