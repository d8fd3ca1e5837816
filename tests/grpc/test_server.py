"""A real server on loopback (port 0, in-process) through a real channel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.grpc.app import SERVICE_NAME
from server.grpc.gen.protoserve.v1 import protoserve_pb2 as pb
from server.grpc.gen.protoserve.v1 import protoserve_pb2_grpc as pb_grpc
from tests.grpc.support import MODEL, ROOT, RUN, Running, create, run01_error, truth

pytestmark = pytest.mark.skipif(not RUN.is_dir(), reason=f"no Omniglot sample run at {RUN}")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path / "data")
    yield r
    r.close()


def register_run(stub: pb_grpc.ProtoserveStub, name: str = "run01") -> None:
    for f in sorted((RUN / "training").glob("*.png")):
        resp = stub.RegisterClass(
            pb.RegisterClassRequest(
                collection=name,
                label=f.stem,
                supports=[pb.Support(image=f.read_bytes(), source=str(f))],
            )
        )
        assert resp.class_info.label == f.stem
        assert resp.class_info.image_supports == 1
        assert len(resp.added_support_ids) == 1


def classify_run(stub: pb_grpc.ProtoserveStub, name: str = "run01", **opts: int) -> float:
    tests = sorted((RUN / "test").glob("*.png"))
    resp = stub.Classify(
        pb.ClassifyRequest(
            collection=name,
            images=[t.read_bytes() for t in tests],
            options=pb.ClassifyOptions(top_k=3, **opts),
        )
    )
    labels = {f.stem for f in (RUN / "training").glob("*.png")}
    assert len(resp.results) == len(tests)
    wanted = truth()
    wrong = 0
    for t, r in zip(tests, resp.results, strict=True):
        assert len(r.predictions) == 3
        assert {p.label for p in r.predictions} <= labels
        probs = [p.probability for p in r.predictions]
        assert probs == sorted(probs, reverse=True)
        assert 0 <= sum(probs) <= 1 + 1e-5
        assert r.entropy >= 0
        assert r.margin == pytest.approx(probs[0] - probs[1], abs=1e-6)
        assert not r.unknown
        wrong += r.predictions[0].label != wanted[t.name]
    return 100.0 * wrong / len(tests)


def test_register_and_classify_run01_matches_eval_runs(running: Running) -> None:
    stub = running.stub
    coll = create(stub)
    assert coll.metric == pb.METRIC_L2 and coll.method == pb.METHOD_PROTOTYPE
    register_run(stub)
    got = stub.GetCollection(pb.GetCollectionRequest(name="run01"))
    assert (got.class_count, got.support_count) == (20, 20)
    assert classify_run(stub) == run01_error()  # `protoserve train eval-runs` on run01
    assert classify_run(stub, method=pb.METHOD_KNN) == run01_error()  # one support per class
    classes = stub.ListClasses(pb.ListClassesRequest(collection="run01")).classes
    assert [c.label for c in classes] == [f"class{i:02d}" for i in range(1, 21)]


def test_transductive_classify_matches_eval_runs_and_needs_prototypes(running: Running) -> None:
    from training.runs import eval_runs

    stub = running.stub
    create(stub)
    register_run(stub)
    tests = sorted((RUN / "test").glob("*.png"))
    request = pb.ClassifyRequest(
        collection="run01",
        images=[t.read_bytes() for t in tests],
        options=pb.ClassifyOptions(top_k=20, transductive=True),
    )
    refined = stub.Classify(request).results
    (offline,) = eval_runs(ROOT / "models" / MODEL, RUN, transductive=True)
    got = {t.name: r.predictions[0].label + ".png" for t, r in zip(tests, refined, strict=True)}
    assert got == offline.predictions  # the server and `eval-runs --transductive` agree
    plain = stub.Classify(pb.ClassifyRequest(collection="run01", images=request.images)).results
    assert [r.predictions[0].probability for r in refined] != pytest.approx(
        [r.predictions[0].probability for r in plain]
    )  # the other images moved the prototypes
    request.options.method = pb.METHOD_KNN
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transductive" in e.value.details() and "knn" in e.value.details()
    one = pb.ClassifyRequest(
        collection="run01",
        images=[request.images[0]],
        options=pb.ClassifyOptions(transductive=True),
    )
    assert len(stub.Classify(one).results) == 1  # one image refines with itself alone


def test_errors_map_to_status_codes_and_server_keeps_serving(running: Running) -> None:
    stub = running.stub
    with pytest.raises(grpc.RpcError) as e:
        stub.GetCollection(pb.GetCollectionRequest(name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(pb.ClassifyRequest(collection="nope", images=[b"x"]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    create(stub)
    with pytest.raises(grpc.RpcError) as e:
        create(stub)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS

    good = sorted((RUN / "training").glob("*.png"))[0].read_bytes()
    stub.RegisterClass(
        pb.RegisterClassRequest(collection="run01", label="a", supports=[pb.Support(image=good)])
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(pb.ClassifyRequest(collection="run01", images=[good, b"not an image"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterClass(
            pb.RegisterClassRequest(
                collection="run01", label="b", supports=[pb.Support(image=b"\x89PNG junk")]
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # no text tower
        stub.Classify(
            pb.ClassifyRequest(
                collection="run01",
                images=[good],
                options=pb.ClassifyOptions(method=pb.METHOD_ZERO_SHOT),
            )
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "text tower" in e.value.details()

    # still serving, and the failed registration left nothing behind
    resp = stub.Classify(pb.ClassifyRequest(collection="run01", images=[good]))
    assert resp.results[0].predictions[0].label == "a"
    labels = [c.label for c in stub.ListClasses(pb.ListClassesRequest(collection="run01")).classes]
    assert labels == ["a"]

    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_stream_and_delete(running: Running) -> None:
    stub = running.stub
    create(stub)
    register_run(stub)
    tests = sorted((RUN / "test").glob("*.png"))[:4]
    items = [pb.ClassifyItem(collection="run01", image=t.read_bytes(), id=t.name) for t in tests]
    results = list(stub.ClassifyStream(iter(items)))
    assert [r.id for r in results] == [t.name for t in tests]
    stub.DeleteCollection(pb.DeleteCollectionRequest(name="run01"))
    assert not stub.ListCollections(pb.ListCollectionsRequest()).collections


def test_state_survives_a_restart(tmp_path: Path) -> None:
    first = Running(tmp_path / "data")
    try:
        create(first.stub)
        register_run(first.stub)
        before = classify_run(first.stub)
    finally:
        first.close()
    second = Running(tmp_path / "data")
    try:
        got = second.stub.GetCollection(pb.GetCollectionRequest(name="run01"))
        assert (got.class_count, got.support_count) == (20, 20)
        assert classify_run(second.stub) == before == run01_error()
    finally:
        second.close()


def test_two_model_instances_answer_concurrent_clients_alike(tmp_path: Path) -> None:
    """``model_instances 2``: two batches run at once, each on its own onnxruntime threads;
    many concurrent one-image requests get the answers a single request gets."""
    from concurrent.futures import ThreadPoolExecutor

    r = Running(tmp_path / "data", model_instances=2, max_batch_size=4)
    try:
        create(r.stub)
        register_run(r.stub)
        assert classify_run(r.stub) == run01_error()
        tests = sorted((RUN / "test").glob("*.png"))
        want = {}
        for t in tests:
            one = r.stub.Classify(pb.ClassifyRequest(collection="run01", images=[t.read_bytes()]))
            want[t.name] = [p.label for p in one.results[0].predictions]

        def ask(i: int) -> tuple[str, list[str]]:
            t = tests[i % len(tests)]
            resp = r.stub.Classify(pb.ClassifyRequest(collection="run01", images=[t.read_bytes()]))
            return t.name, [p.label for p in resp.results[0].predictions]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(80)))
        assert all(labels == want[name] for name, labels in got)
        (stats,) = r.server.pipeline.batcher_stats()
        assert stats.items_run >= 80 + 20 + 20 and stats.failed_batches == 0
        m = r.server.pipeline.model(MODEL)
        assert m.batcher.instances == 2 and m.narrow is not None
        assert m.narrow.config.intra_op_threads == max(1, len(os.sched_getaffinity(0)) // 2)
    finally:
        r.close()


def test_model_instances_automatic_and_one(tmp_path: Path) -> None:
    """0 (automatic, the default): 2 instances for a model on the CPU of a 2+ core machine;
    1: no second copy of the tower."""
    for setting, want in ((0, 2 if len(os.sched_getaffinity(0)) >= 2 else 1), (1, 1)):
        r = Running(tmp_path / f"data{setting}", model_instances=setting)
        try:
            m = r.server.pipeline.model(MODEL)
            assert m.batcher.instances == want and (m.narrow is None) == (want == 1)
        finally:
            r.close()


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_threads_follow_the_cpus_the_process_may_use(tmp_path: Path) -> None:
    """Under ``taskset -c 0`` the automatic settings give one instance on one thread
    (onnxruntime's own default counts the machine's cores, not the process's CPUs)."""
    code = (
        "import sys; from pathlib import Path\n"
        "from server.model_repo import ModelRepository\n"
        "from server.pipeline import Pipeline, PipelineOptions\n"
        "from server.registry import Registry\n"
        "reg = Registry.open(Path(sys.argv[1]))\n"
        "opts = PipelineOptions(model_instances=0)\n"
        "p = Pipeline(reg, ModelRepository(Path(sys.argv[2])), opts)\n"
        f"m = p.model({MODEL!r})\n"
        "print(m.batcher.instances, m.runtime.intra_op_threads)\n"
        "p.close()\n"
    )
    argv = ["taskset", "-c", "0", sys.executable, "-c", code, str(tmp_path / "d")]
    out = subprocess.run(
        [*argv, str(ROOT / "models")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1"]
