"""server.kernels against a float64 numpy reference, on every CPU path."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import kernels as K
from tests.kernel_reference import check_topk, ref_scores, ref_topk, tolerance


@pytest.fixture(autouse=True)
def always_split():
    """Small calls normally run in the calling thread (``min_parallel_macs``); these tests
    split every call over the pool, so the chunking and merging paths see the small,
    adversarial shapes too. ``test_small_calls_run_inline_with_the_same_answers`` covers
    the default."""
    before = K.min_parallel_macs()
    K.set_min_parallel_macs(0)
    yield
    K.set_min_parallel_macs(before)


METRICS = ["cosine", "ip", "l2"]
DTYPES = ["float32", "bfloat16"]
# bf16 scans may swap near-equal candidates before the exact re-rank; the
# returned scores are exact either way.
BF16_RANK_REL = 2e-3


def gaussian(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.standard_normal((n, d)).astype(np.float32)


def rank_rel(dtype: str) -> float | None:
    return BF16_RANK_REL if dtype == "bfloat16" else None


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q", "c", "d", "k"),
    [
        (0, 10, 8, 3),
        (3, 0, 8, 3),
        (1, 1, 1, 1),
        (1, 1, 17, 5),  # k > C
        (5, 33, 3, 40),  # k > C, C not a multiple of the panel width
        (13, 100, 31, 7),  # Q past one query block, D odd
        (25, 515, 130, 10),
        (7, 64, 4096, 5),  # D up to 4096
        (2, 3000, 512, 5),  # several tiles and thread chunks
    ],
)
def test_topk_matches_reference(simd, metric, dtype, q, c, d, k):
    rng = np.random.default_rng(q * 1000 + c + d)
    queries, protos = gaussian(rng, q, d), gaussian(rng, c, d)
    pm = K.PrototypeMatrix(protos if c else np.zeros((0, d), np.float32), dtype, metric)
    s, i = K.topk(queries, pm, k)
    check_topk(queries, protos, k, metric, s, i, score_rel=rank_rel(dtype))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_matches_reference(simd, metric, dtype):
    rng = np.random.default_rng(7)
    queries, protos = gaussian(rng, 14, 45), gaussian(rng, 50, 45)
    out = K.scores(queries, K.PrototypeMatrix(protos, dtype, metric))
    assert out.shape == (14, 50) and out.dtype == np.float32
    rel = 4e-3 if dtype == "bfloat16" else 2e-6
    np.testing.assert_allclose(
        out,
        ref_scores(queries, protos, metric),
        atol=tolerance(queries, protos, metric, rel),
        rtol=0,
    )


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lower_index(simd, metric, dtype):
    rng = np.random.default_rng(3)
    base = gaussian(rng, 5, 19)
    protos = np.concatenate([base, base, base, base[::-1]])  # every row 4 times
    pm = K.PrototypeMatrix(protos, dtype, metric)
    s, i = K.topk(base, pm, 8)
    for qi in range(5):
        # Query qi's best rows are the copies of itself: qi, qi+5, qi+10, 19-qi... in order.
        copies = sorted([qi, qi + 5, qi + 10, 15 + (4 - qi)])
        assert i[qi, :4].tolist() == copies
        assert np.all(s[qi, :4] == s[qi, 0])


def test_raw_array_prototypes_take_metric_keyword(simd):
    rng = np.random.default_rng(1)
    queries, protos = gaussian(rng, 4, 10), gaussian(rng, 20, 10)
    for metric in METRICS:
        s, i = K.topk(queries, protos, 3, metric=metric)
        check_topk(queries, protos, 3, metric, s, i)
    s, i = K.topk(queries, protos, 3)  # cosine by default
    check_topk(queries, protos, 3, "cosine", s, i)


def test_single_query_vector_is_one_row():
    rng = np.random.default_rng(2)
    protos = gaussian(rng, 9, 6)
    s, i = K.topk(protos[3], protos, 2, metric="ip")
    assert s.shape == (1, 2) and i[0, 0] == int(np.argmax(protos @ protos[3]))


def test_float64_and_float16_inputs_are_converted():
    rng = np.random.default_rng(4)
    protos = rng.standard_normal((12, 8))
    _s64, i64 = K.topk(protos[:2], protos, 3, metric="ip")
    _s32, i32 = K.topk(protos[:2].astype(np.float32), protos.astype(np.float32), 3, metric="ip")
    assert (i64 == i32).all()
    K.topk(protos[:2].astype(np.float16), protos, 3, metric="ip")


def test_zero_vectors_under_cosine_score_zero():
    protos = np.array([[0, 0, 0], [1, 0, 0]], np.float32)
    s, i = K.topk(np.array([[0, 0, 0], [0, 1, 0]], np.float32), protos, 2)
    assert s.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert i.tolist() == [[0, 1], [0, 1]]


# ---------------------------------------------------------------- edits


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_update_remove_track_a_reference(simd, metric, dtype):
    rng = np.random.default_rng(11)
    d = 23
    pm = K.PrototypeMatrix(np.zeros((0, d), np.float32), dtype, metric)
    rows: list[np.ndarray] = []
    ids: list[int] = []
    next_id = 0
    for step in range(120):
        op = rng.integers(0, 4) if rows else 0
        if op in (0, 1):  # append a few
            n = int(rng.integers(1, 40))
            new = gaussian(rng, n, d)
            got = pm.append(new)
            assert got.tolist() == list(range(next_id, next_id + n))
            rows.extend(new)
            ids.extend(got.tolist())
            next_id += n
        elif op == 2:
            j = int(rng.integers(0, len(rows)))
            rows[j] = gaussian(rng, 1, d)[0]
            pm.update(j, rows[j])
        else:
            j = int(rng.integers(0, len(rows)))
            moved = pm.remove(j)
            last = len(rows) - 1
            assert moved == (None if j == last else last)
            rows[j], ids[j] = rows[last], ids[last]
            rows.pop()
            ids.pop()
        if step % 10 == 0 or step == 119:
            ref = np.array(rows, np.float32).reshape(-1, d)
            assert len(pm) == len(rows) and pm.ids.tolist() == ids
            np.testing.assert_allclose(
                pm.to_numpy(), K.PrototypeMatrix(ref, "float32", metric).to_numpy(), atol=1e-7
            )
            queries = gaussian(rng, 6, d)
            s, i = K.topk(queries, pm, 5)
            check_topk(queries, ref, 5, metric, s, i, score_rel=rank_rel(dtype))


def test_growth_is_amortised():
    """Appending one row at a time costs amortised O(1) copies (capacity doubles)."""
    pm = K.PrototypeMatrix(np.zeros((0, 64), np.float32), metric="ip")
    sizes = set()
    for r in range(3000):
        pm.append(np.full((1, 64), r, np.float32))
        sizes.add(pm.nbytes)
    assert len(sizes) < 20  # a handful of reallocations, not one per row
    assert pm.to_numpy()[2999, 0] == 2999


def test_row_of_and_explicit_ids():
    pm = K.PrototypeMatrix(np.eye(4, dtype=np.float32), metric="ip", ids=[10, 20, 30, 40])
    assert pm.row_of(30) == 2
    pm.remove(0)
    assert pm.row_of(40) == 0
    with pytest.raises(KeyError):
        pm.row_of(10)


# ---------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(
    q=st.integers(0, 20),
    c=st.integers(0, 70),
    d=st.integers(1, 40),
    k=st.integers(1, 80),
    metric=st.sampled_from(METRICS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_random(q, c, d, k, metric, dtype, seed):
    rng = np.random.default_rng(seed)
    queries, protos = gaussian(rng, q, d), gaussian(rng, c, d)
    s, i = K.topk(queries, K.PrototypeMatrix(protos, dtype, metric, dim=d), k)
    check_topk(queries, protos, k, metric, s, i, score_rel=rank_rel(dtype))


@settings(max_examples=150, deadline=None)
@given(
    q=st.integers(1, 15),
    c=st.integers(1, 60),
    d=st.integers(1, 20),
    k=st.integers(1, 70),
    metric=st.sampled_from(["ip", "l2"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_exact_ties_on_small_integers(q, c, d, k, metric, dtype, seed):
    """Small integers make every product exact: indices must equal the stable reference."""
    rng = np.random.default_rng(seed)
    queries = rng.integers(-2, 3, (q, d)).astype(np.float32)
    protos = rng.integers(-2, 3, (c, d)).astype(np.float32)
    s, i = K.topk(queries, K.PrototypeMatrix(protos, dtype, metric), k)
    rs, ri = ref_topk(queries, protos, k, metric)
    assert (i == ri).all()
    assert (s == rs).all()


# ---------------------------------------------------------------- bf16 recall


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_bf16_recall_at_1_against_exact_fp32(metric):
    rng = np.random.default_rng(2024)
    protos = gaussian(rng, 20_000, 512)
    queries = gaussian(rng, 10_000, 512)
    p_ref = protos / np.linalg.norm(protos, axis=1, keepdims=True) if metric == "cosine" else protos
    q_ref = (
        queries / np.linalg.norm(queries, axis=1, keepdims=True) if metric == "cosine" else queries
    )
    exact = np.concatenate(
        [np.argmax(q_ref[a : a + 1000] @ p_ref.T, axis=1) for a in range(0, 10_000, 1000)]
    )
    _, i = K.topk(queries, K.PrototypeMatrix(protos, "bfloat16", metric), 1)
    recall = float((i[:, 0] == exact).mean())
    assert recall >= 0.999, recall


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    pm = K.PrototypeMatrix(np.ones((3, 4), np.float32), metric="ip")
    q = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        K.topk(q, pm, 0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        K.topk(q, pm, -1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        K.topk(q, pm, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimension 5, prototypes have 4"):
        K.topk(np.ones((2, 5), np.float32), pm, 1)
    with pytest.raises(ValueError, match="2-D"):
        K.topk(np.ones((2, 2, 4), np.float32), pm, 1)
    with pytest.raises(TypeError, match="dtype int64"):
        K.topk(np.ones((2, 4), np.int64), pm, 1)
    with pytest.raises(TypeError, match="dtype"):
        K.PrototypeMatrix(np.ones((2, 4), bool))
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinity.*row: 1"):
        K.topk(bad, pm, 1)
    with pytest.raises(ValueError, match="NaN or infinity"):
        pm.append(np.full((1, 4), np.inf, np.float32))
    with pytest.raises(ValueError, match="metric must be one of"):
        K.PrototypeMatrix(np.ones((1, 4), np.float32), metric="euclid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype must be one of"):
        K.PrototypeMatrix(np.ones((1, 4), np.float32), dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric='l2' given"):
        K.topk(q, pm, 1, metric="l2")
    with pytest.raises(IndexError, match="out of range"):
        pm.update(3, np.ones(4, np.float32))
    with pytest.raises(IndexError, match="out of range"):
        pm.remove(-1)
    with pytest.raises(ValueError, match="SIMD level"):
        K.set_simd_level("avx9000")
    assert len(pm) == 3  # nothing was half-applied


# ---------------------------------------------------------------- bf16 rounding


def test_to_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, 1e-40, 0.0, -0.0], np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    expected = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    assert (K.to_bfloat16(x) == expected).all()
    # 1 + 2**-8 is halfway between two bf16 values: ties to even (1.0).
    assert K.to_bfloat16(np.float32([1.00390625]))[0] == 0x3F80


# ---------------------------------------------------------------- threads


def test_scan_releases_the_gil():
    rng = np.random.default_rng(5)
    pm = K.PrototypeMatrix(gaussian(rng, 60_000, 256), metric="ip")
    queries = gaussian(rng, 64, 256)
    done = threading.Event()
    ticks = 0

    def scan() -> None:
        for _ in range(3):
            K.topk(queries, pm, 5)
        done.set()

    t = threading.Thread(target=scan)
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.0005)
    t.join()
    assert ticks > 20  # the Python thread kept running during the scans


def test_concurrent_edits_and_scans_are_safe():
    rng = np.random.default_rng(6)
    pm = K.PrototypeMatrix(gaussian(rng, 100, 32), metric="l2")
    queries = gaussian(rng, 8, 32)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(200):
                s, i = K.topk(queries, pm, 3)
                assert (i >= 0).all() and np.isfinite(s).all()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def writer() -> None:
        for _ in range(200):
            pm.append(gaussian(rng, 50, 32))

    threads = [threading.Thread(target=reader) for _ in range(3)] + [
        threading.Thread(target=writer)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(pm) == 100 + 200 * 50


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_small_calls_run_inline_with_the_same_answers(dtype):
    rng = np.random.default_rng(21)
    q, p = gaussian(rng, 3, 40), gaussian(rng, 37, 40)
    pm = K.PrototypeMatrix(p, dtype=dtype, metric="l2")
    split = K.topk(q, pm, 5), K.scores(q, pm)
    K.set_min_parallel_macs(1 << 40)  # everything inline
    assert K.min_parallel_macs() == 1 << 40
    inline = K.topk(q, pm, 5), K.scores(q, pm)
    assert (split[0][1] == inline[0][1]).all()
    np.testing.assert_array_equal(split[0][0], inline[0][0])
    np.testing.assert_array_equal(split[1], inline[1])
    with pytest.raises(ValueError):
        K.set_min_parallel_macs(-1)


def test_thread_count_is_configurable():
    before = K.num_threads()
    try:
        K.set_num_threads(1)
        assert K.num_threads() == 1
        rng = np.random.default_rng(8)
        q, p = gaussian(rng, 3, 16), gaussian(rng, 500, 16)
        s, i = K.topk(q, p, 4, metric="ip")
        check_topk(q, p, 4, "ip", s, i)
    finally:
        K.set_num_threads(before)
    with pytest.raises(ValueError):
        K.set_num_threads(0)
