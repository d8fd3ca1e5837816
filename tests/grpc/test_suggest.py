"""Label suggestions: the ``Suggest`` RPC and ``protoserve suggest`` against a real server on
port 0, with run01's 20 training images registered (one class each) and its 20 test images
as the pool. Every ranking is checked against ``training.active`` applied to what Classify
and Embed return for the same images."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from server.cli import main
from server.client import ProtoserveClient
from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from server.suggest import CANDIDATES_FACTOR
from tests.grpc.support import (
    MODEL,
    ROOT,
    RUN,
    Running,
    create,
    fails,
    model_shape,
    needs_run,
    register,
    still_serving,
    training_images,
)
from training import active

pytestmark = needs_run

STRATEGY = {
    "margin": pb.STRATEGY_MARGIN,
    "entropy": pb.STRATEGY_ENTROPY,
    "least-confidence": pb.STRATEGY_LEAST_CONFIDENCE,
    "diverse": pb.STRATEGY_DIVERSE,
}
BROKEN = "broken.png"


class Env:
    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "data"
        self.running = Running(self.data)
        self.stub = self.running.stub
        self.target = f"127.0.0.1:{self.running.port}"
        self.supports = [f.read_bytes() for f in training_images()]
        create(self.stub)  # l2, the model's metric
        self.stub.CreateCollection(
            pb.CreateCollectionRequest(
                collection=pb.Collection(name="cos", model=MODEL, metric=pb.METRIC_COSINE)
            )
        )
        for name in ("run01", "cos"):
            for f, data in zip(training_images(), self.supports, strict=True):
                register(self.stub, name, f.stem, data)
        self.test_files = sorted((RUN / "test").glob("*.png"))
        self.pool = [f.read_bytes() for f in self.test_files]
        self.folder = tmp / "pool"
        self.folder.mkdir()
        for f in self.test_files:
            shutil.copy(f, self.folder / f.name)
        (self.folder / BROKEN).write_bytes(b"not an image at all")

    def probs(self, images: list[bytes], name: str = "run01") -> np.ndarray:
        """[N, C] over every class, from Classify's top-C (columns: sorted labels)."""
        resp = self.stub.Classify(
            pb.ClassifyRequest(
                collection=name, images=images, options=pb.ClassifyOptions(top_k=100)
            )
        )
        rows = []
        for r in resp.results:
            by_label = {p.label: p.probability for p in r.predictions}
            rows.append([by_label[k] for k in sorted(by_label)])
        return np.array(rows, np.float64)

    def embed(self, images: list[bytes], name: str) -> np.ndarray:
        resp = self.stub.Embed(
            pb.EmbedRequest(collection=name, images=images, normalize=name == "cos")
        )
        return np.array([e.values for e in resp.image_embeddings], np.float64)

    def suggest(self, images: list[bytes], budget: int, strategy: str, name: str = "run01") -> Any:
        return self.stub.Suggest(
            pb.SuggestRequest(
                collection=name, images=images, budget=budget, strategy=STRATEGY[strategy]
            )
        )

    def close(self) -> None:
        self.running.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("suggest"))
    try:
        yield e
    finally:
        e.close()


def _jittered(data: bytes, seed: int) -> bytes:
    """The image with a few pixels flipped: a near-duplicate, not a byte copy."""
    img = np.array(Image.open(io.BytesIO(data)).convert("L"))
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, img.shape[0], 6), rng.integers(0, img.shape[1], 6)
    img[ys, xs] = 255 - img[ys, xs]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


# -- the RPC --------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["margin", "entropy", "least-confidence"])
def test_uncertainty_order_is_training_active_on_classify_probabilities(
    env: Env, strategy: str
) -> None:
    probs = env.probs(env.pool)
    want = active.select(strategy, 20, probs=probs)
    want_scores = active.uncertainty(strategy, probs=probs)
    resp = env.suggest(env.pool, 20, strategy)
    assert [s.index for s in resp.suggestions] == want.tolist()
    for s in resp.suggestions:
        assert s.score == pytest.approx(want_scores[s.index], abs=1e-5)
        assert s.prediction.probability == pytest.approx(probs[s.index].max(), abs=1e-6)
    # a smaller budget is a prefix; the top prediction is Classify's
    top = env.suggest(env.pool, 5, strategy).suggestions
    assert [s.index for s in top] == want[:5].tolist()
    classify = env.stub.Classify(pb.ClassifyRequest(collection="run01", images=env.pool))
    assert [s.prediction.label for s in top] == [
        classify.results[s.index].predictions[0].label for s in top
    ]


@pytest.mark.parametrize("name", ["run01", "cos"])
def test_diverse_is_training_active_select_with_every_support_as_covered(
    env: Env, name: str
) -> None:
    """The server covers only each image's nearest support; the choice equals covering all."""
    probs = env.probs(env.pool, name)
    want = active.select(
        "diverse",
        6,
        probs=probs,
        embeddings=env.embed(env.pool, name),
        labeled_embeddings=env.embed(env.supports, name),
        candidates_factor=CANDIDATES_FACTOR,
    )
    resp = env.suggest(env.pool, 6, "diverse", name)
    assert [s.index for s in resp.suggestions] == want.tolist()
    margin = active.margin_score(probs)
    for s in resp.suggestions:
        assert s.score == pytest.approx(margin[s.index], abs=1e-5)


def test_diverse_avoids_near_duplicates_and_registered_supports(env: Env) -> None:
    probs = env.probs(env.pool)
    worst = int(active.select("margin", 1, probs=probs)[0])  # the most uncertain test image
    dups = [env.pool[worst], _jittered(env.pool[worst], 1), _jittered(env.pool[worst], 2)]
    near_supports = [_jittered(s, 3) for s in env.supports[:5]]
    images = env.pool + dups + near_supports + env.supports[5:10]
    group = {worst, 20, 21, 22}
    support_like = set(range(23, len(images)))
    # margin alone takes the near-duplicates of the most uncertain image together
    margin = [s.index for s in env.suggest(images, 3, "margin").suggestions]
    assert len(group & set(margin)) >= 2
    picked = [s.index for s in env.suggest(images, 12, "diverse").suggestions]
    assert len(picked) == len(set(picked)) == 12
    assert len(group & set(picked)) == 1, picked
    assert not support_like & set(picked), picked


def test_budget_above_the_images_returns_them_all(env: Env) -> None:
    for strategy in STRATEGY:
        resp = env.suggest(env.pool[:4], 50, strategy)
        assert sorted(s.index for s in resp.suggestions) == [0, 1, 2, 3]


def test_scores_only_gives_every_image_in_order(env: Env) -> None:
    with ProtoserveClient(env.target) as c:
        got = c.suggest("run01", env.pool[:5], 0, strategy="diverse", scores_only=True)
        plain = c.suggest("run01", env.pool[:5], 0, strategy="entropy", scores_only=True)
    assert [s.index for s in got.items] == [0, 1, 2, 3, 4]
    assert len(got.labels) == 20 and got.labels == tuple(sorted(got.labels))
    probs = np.array([s.probabilities for s in got.items])
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert [s.score for s in got.items] == pytest.approx(active.margin_score(probs).tolist())
    dim = model_shape()[2]
    for s in got.items:
        assert len(s.embedding) == len(s.nearest_support) == dim and s.nearest_support_id > 0
    assert [s.score for s in plain.items] == pytest.approx(
        active.entropy_score(probs).tolist(), abs=1e-9
    )
    assert all(not s.embedding and not s.probabilities for s in plain.items)


def test_errors_and_the_server_keeps_serving(env: Env) -> None:
    stub, pool = env.stub, env.pool
    ok = pb.SuggestRequest(collection="run01", images=pool[:3], budget=2)
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    FAILED = grpc.StatusCode.FAILED_PRECONDITION

    def call(**changes: Any) -> Any:
        req = pb.SuggestRequest()
        req.CopyFrom(ok)
        for k, v in changes.items():
            if k == "images":
                del req.images[:]
                req.images.extend(v)
            else:
                setattr(req, k, v)
        return lambda: stub.Suggest(req)

    fails(call(collection="nope"), NOT_FOUND, "nope")
    fails(call(budget=0), INVALID, "budget")
    fails(call(budget=-3), INVALID, "budget")
    fails(call(strategy=99), INVALID, "strategy")
    fails(call(images=[]), INVALID, "images")
    fails(call(images=[pool[0], pool[1], b"junk"]), INVALID, "image 2")
    fails(call(images=[b"x"] * 257), INVALID, "max_images_per_request")
    create(stub, "empty")
    fails(call(collection="empty"), FAILED, "empty")
    fails(call(collection="empty", strategy=pb.STRATEGY_DIVERSE), FAILED)
    create(stub, "one")
    register(stub, "one", "only", env.supports[0])
    fails(call(collection="one"), FAILED, "at least 2")
    with ProtoserveClient(env.target) as c:
        with pytest.raises(Exception, match="strategy"):
            c.suggest("run01", pool[:2], 1, strategy="bald")
    assert len(stub.Suggest(ok).suggestions) == 2
    still_serving(stub)
    metrics = env.running.server.metrics
    assert metrics is not None  # the interceptor counts Suggest like every RPC
    count = metrics.registry.get_sample_value
    assert count("protoserve_requests_total", {"rpc": "Suggest", "code": "NOT_FOUND"}) == 1
    assert count("protoserve_requests_total", {"rpc": "Suggest", "code": "INVALID_ARGUMENT"}) >= 6


# -- the CLI --------------------------------------------------------------------------------------
def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["suggest", "--collection", "run01", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("strategy", ["margin", "diverse"])
def test_cli_folder_in_chunks_equals_one_request(
    env: Env, strategy: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    budget = 3 if strategy == "diverse" else 6  # diverse: 30 candidates > 20 images per chunk
    want = [
        env.test_files[s.index].name for s in env.suggest(env.pool, budget, strategy).suggestions
    ]
    out_file = tmp_path / "picks.csv"
    rc, out, err = _cli(
        capsys,
        "--input", str(env.folder),
        "--budget", str(budget),
        "--strategy", strategy,
        "--batch", "3",
        "--concurrency", "2",
        "--json",
        "--output", str(out_file),
        "--server", env.target,
    )  # fmt: skip
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == want
    assert [r["rank"] for r in rows] == list(range(1, budget + 1))
    assert f"skipped {env.folder / BROKEN}" in err
    assert out_file.read_text().splitlines()[0] == "rank,path,score,label,probability"
    assert len(out_file.read_text().splitlines()) == budget + 1


def test_cli_diverse_in_chunks_keeps_only_the_candidates(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """budget 1: 10 candidates of 20 images, spread over chunks of 3: still the same pick."""
    want = env.suggest(env.pool, 1, "diverse").suggestions[0].index
    rc, out, err = _cli(
        capsys, "--input", str(env.folder), "--budget", "1", "--strategy", "diverse",
        "--batch", "3", "--server", env.target,
    )  # fmt: skip
    assert rc == 0, err
    assert out.split()[1] == str(env.folder / env.test_files[want].name)


def test_cli_manifest_listing_paths_twice_counts_each_once(
    env: Env, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    want = [env.test_files[s.index].name for s in env.suggest(env.pool, 2, "margin").suggestions]
    names = [f.name for f in env.test_files]
    # the best image twice in the chunk with the second best, and once more in a later chunk
    rows = [want[0], want[0], want[1], *(n for n in names if n not in want), want[0]]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{env.folder / n}\n" for n in rows))
    rc, out, err = _cli(
        capsys, "--input", str(manifest), "--budget", "2", "--batch", "6",
        "--server", env.target,
    )  # fmt: skip
    assert rc == 0, err
    assert [Path(line.split()[1]).name for line in out.splitlines()] == want


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_cli_from_a_score_output(
    env: Env, ext: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if ext == "parquet":
        pytest.importorskip("pyarrow")
    scores = tmp_path / f"scores.{ext}"
    rc = main(
        ["score", "--collection", "run01", "--input", str(env.folder), "--output", str(scores),
         "--top-k", "3", "--no-progress", "--server", env.target]
    )  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    for strategy in ("margin", "entropy", "least-confidence"):
        want = [
            env.test_files[s.index].name for s in env.suggest(env.pool, 5, strategy).suggestions
        ]
        rc, out, err = _cli(
            capsys, "--input", str(scores), "--budget", "5", "--strategy", strategy, "--json",
            "--server", "127.0.0.1:1",  # never contacted: ranked from the file's columns
        )  # fmt: skip
        assert rc == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert [Path(r["path"]).name for r in rows] == want
        assert "5 of 20 images" in err  # the broken image's error row is not ranked
    rc, _, err = _cli(
        capsys, "--input", str(scores), "--budget", "5", "--strategy", "diverse",
        "--server", "127.0.0.1:1",
    )  # fmt: skip
    assert rc == 2 and "needs the images" in err


def test_cli_errors(env: Env, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ("--input", str(env.folder), "--server", env.target)
    rc, _, err = _cli(capsys, *base, "--budget", "0")
    assert rc == 2 and "--budget" in err
    rc, _, err = _cli(capsys, *base, "--budget", "2", "--output", str(tmp_path / "x.txt"))
    assert rc == 2 and "extension" in err
    rc, _, err = _cli(capsys, "--input", str(tmp_path / "missing"), "--budget", "2")
    assert rc == 2 and "does not exist" in err
    rc = main(["suggest", "--collection", "nope", *base, "--budget", "2"])
    assert rc == 1 and "NOT_FOUND" in capsys.readouterr().err


def test_cli_in_process_matches_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    r = Running(data)
    try:
        create(r.stub)
        for f in training_images():
            register(r.stub, "run01", f.stem, f.read_bytes())
        pool = [f.read_bytes() for f in sorted((RUN / "test").glob("*.png"))]
        want = r.stub.Suggest(
            pb.SuggestRequest(
                collection="run01", images=pool, budget=4, strategy=pb.STRATEGY_DIVERSE
            )
        )
    finally:
        r.close()  # the in-process pipeline opens the same registry
    files = sorted((RUN / "test").glob("*.png"))
    rc, out, err = _cli(
        capsys, "--input", str(RUN / "test"), "--budget", "4", "--strategy", "diverse",
        "--batch", "7", "--in-process", "--data-dir", str(data),
        "--model-repo", str(ROOT / "models"),
    )  # fmt: skip
    assert rc == 0, err
    got = [line.split()[1] for line in out.splitlines()]
    assert got == [str(files[s.index]) for s in want.suggestions]


def test_the_suggest_path_does_not_import_torch() -> None:
    code = (
        "import sys, server.grpc.app, server.suggest, server.suggest_cli, training.active; "
        "import server.cli; server.cli.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
