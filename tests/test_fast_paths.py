"""The fast paths give what the plain reference path (np.linalg.svd) gives.

- `spectral.GramEigen`: Gram matrix accumulated in float64 blocks, one tridiagonal reduction shared
  by the spectrum (EVBMF) and the leading vectors (decompositions);
- the planner's eigendecompositions reused by the decomposition (`LayerSpectra`);
- `truncated_svd` reading float32 weights in blocks, its error computed without reconstructing;
- lazy loading: weights read from the file one at a time, and the light copy given to onnx.checker.

Subspaces are compared through their orthogonal projectors (sign/rotation free), on matrices with a
clear gap at the chosen rank so that the reference subspace is well defined.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_tucker as ot
from onnx_tucker.config import CompressionConfig
from onnx_tucker.graph import lazyload
from onnx_tucker.graph.load import light_for_checker, load_model
from onnx_tucker.numerics import spectral
from onnx_tucker.numerics.evbmf import evbmf_from_singular_values, singular_values
from onnx_tucker.numerics.spectral import GramEigen, LayerSpectra, gram_short_side
from onnx_tucker.numerics.tucker import leading_left_vectors, truncated_svd, tucker2, unfold
from onnx_tucker.ops import svd_matrix
from onnx_tucker.ops.layer import Layer
from onnx_tucker.planning.decompose import decompose_layer
from onnx_tucker.planning.planner import plan_layer
from tests.helpers import low_rank_kernel, low_rank_plus_noise, make_gemm_model, make_small_cnn, save

SHAPES = [(1, 7), (7, 1), (5, 5), (12, 40), (40, 12), (64, 576), (300, 45), (256, 2304)]


def _projector_gap(u: np.ndarray, v: np.ndarray) -> float:
    """max |P_u - P_v|: 0 for the same subspace whatever the basis."""
    return float(np.abs(u @ u.T - v @ v.T).max())


def _reference_left(a: np.ndarray, r: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(np.asarray(a, dtype=np.float64), full_matrices=False)
    return u[:, :r]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_singular_values_match_svd(shape: tuple[int, int], dtype: type) -> None:
    a = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    ref = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    ours = GramEigen(a).singular_values
    assert ours.shape == ref.shape
    # Gram-based: absolute accuracy ~ eps * s_max (small values are not resolved better than that)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12 * ref[0])
    np.testing.assert_array_equal(singular_values(a), ours)


@pytest.mark.parametrize("shape", [(64, 576), (576, 64), (300, 45), (45, 300), (200, 200)])
def test_leading_subspace_matches_svd(shape: tuple[int, int]) -> None:
    r = 9
    a = low_rank_plus_noise(np.random.default_rng(1), shape, r, sigma=0.01).astype(np.float32)
    ours = GramEigen(a).left_vectors(r, a)
    ref = _reference_left(a, r)
    assert ours.shape == (shape[0], r)
    np.testing.assert_allclose(ours.T @ ours, np.eye(r), atol=1e-12)
    assert _projector_gap(ours, ref) < 1e-9
    # and the same through the public function, with and without a precomputed GramEigen
    assert _projector_gap(leading_left_vectors(a, r), ref) < 1e-9


def test_left_vectors_beyond_the_rank_of_a_tall_matrix_are_orthonormal() -> None:
    a = np.random.default_rng(2).standard_normal((30, 4))
    u = GramEigen(a).left_vectors(10, a)
    np.testing.assert_allclose(u.T @ u, np.eye(10), atol=1e-12)
    assert _projector_gap(u[:, :4], _reference_left(a, 4)) < 1e-10


def test_zero_and_rank_deficient_matrices() -> None:
    z = GramEigen(np.zeros((6, 9)))
    assert np.all(z.singular_values == 0) and z.eigenvectors(3).shape == (6, 3)
    a = np.outer(np.arange(1.0, 7.0), np.arange(1.0, 10.0))  # rank 1
    s = GramEigen(a).singular_values
    assert s[0] == pytest.approx(np.linalg.norm(a)) and np.all(s[1:] < 1e-6 * s[0])


def test_blocked_gram_equals_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    a = np.random.default_rng(3).standard_normal((37, 500)).astype(np.float32)
    one = gram_short_side(a)
    monkeypatch.setattr(spectral, "_BLOCK_BYTES", 8 * 37 * 16)  # 16 columns per block: 32 blocks
    blocked = gram_short_side(a)
    tall = gram_short_side(a.T)
    ref = a.astype(np.float64) @ a.astype(np.float64).T
    np.testing.assert_allclose(one, ref, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(blocked, ref, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(tall, blocked, rtol=0, atol=0)  # same blocks either way round


@pytest.mark.parametrize("shape,rank", [((128, 1152), 20), ((1000, 256), 37), ((96, 96), 11)])
def test_evbmf_rank_is_the_same_as_on_the_svd_spectrum(shape: tuple[int, int], rank: int) -> None:
    a = low_rank_plus_noise(np.random.default_rng(4), shape, rank, sigma=0.02).astype(np.float32)
    ref = evbmf_from_singular_values(np.linalg.svd(a.astype(np.float64), compute_uv=False), shape)
    ours = evbmf_from_singular_values(GramEigen(a).singular_values, shape)
    assert ours.rank == ref.rank == rank
    assert ours.sigma2 == pytest.approx(ref.sigma2, rel=1e-9)


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_truncated_svd_matches_reference(shape: tuple[int, int], dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("onnx_tucker.numerics.tucker._BLOCK_BYTES", 8 * 40 * 7)  # several projection blocks
    r = 6
    w = low_rank_plus_noise(np.random.default_rng(5), shape, r, sigma=0.05).astype(dtype)
    f = truncated_svd(w, r)
    w64 = w.astype(np.float64)
    u, s, vt = np.linalg.svd(w64, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vt[:r]
    np.testing.assert_allclose(f.left @ f.right, best, atol=1e-9 * s[0])
    exact = np.linalg.norm(w64 - f.left @ f.right) / np.linalg.norm(w64)
    assert f.rel_error == pytest.approx(exact, rel=1e-9)
    assert f.rel_error == pytest.approx(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)), rel=1e-9)


def test_truncated_svd_error_at_full_rank_is_computed_exactly() -> None:
    w = np.random.default_rng(6).standard_normal((20, 50)).astype(np.float32)
    f = truncated_svd(w, 20)
    assert f.rel_error is not None and f.rel_error < 1e-12  # not sqrt(eps) from cancellation


def test_svd_matrix_of_a_float32_gemm_is_a_view() -> None:
    w = np.ones((8, 5), dtype=np.float32)
    layer = Layer("fc", "Gemm", 0, "W", (8, 5), attrs={"transB": 1})
    m = svd_matrix(layer, w)
    assert m.dtype == np.float32 and m.shape == (5, 8) and np.shares_memory(m, w)
    scaled = svd_matrix(Layer("fc", "Gemm", 0, "W", (8, 5), attrs={"transB": 1, "alpha": 0.5}), w)
    np.testing.assert_array_equal(scaled, 0.5 * w.T)


def _conv_layer(T: int, S: int, k: tuple[int, ...]) -> Layer:
    return Layer("conv", "Conv", 0, "W", (T, S, *k), attrs={}, input_shape=(1, S, 8, 8), output_shape=(1, T, 8, 8))


@pytest.mark.parametrize("hooi", [0, 1])
def test_planner_spectra_reused_by_decomposition_change_nothing(hooi: int) -> None:
    w = low_rank_kernel(np.random.default_rng(7), 64, 48, (3, 3), 12, 10, noise=0.05)
    layer = _conv_layer(64, 48, (3, 3))
    spectra = LayerSpectra()
    cfg = CompressionConfig(validate=False)
    lp = plan_layer(layer, lambda _: w, cfg, spectra=spectra)
    assert lp.kind == "tucker2" and lp.ranks == (12, 10)
    shared = decompose_layer(layer, lp, w, hooi, spectra)
    fresh = decompose_layer(layer, lp, w, hooi)
    for a, b in zip(shared.arrays, fresh.arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    assert shared.rel_error == fresh.rel_error
    # and the HOSVD factors span what an SVD of each unfolding gives
    f = tucker2(w, 12, 10)
    assert _projector_gap(f.u_out, _reference_left(unfold(w, 0), 12)) < 1e-9
    assert _projector_gap(f.u_in, _reference_left(unfold(w, 1), 10)) < 1e-9


def test_layer_spectra_recomputes_for_another_shape() -> None:
    s = LayerSpectra()
    a, b = np.eye(3, 5), np.eye(5, 4)
    e = s.eigen(0, a)
    assert s.eigen(0, a) is e
    assert s.eigen(0, b).shape == (5, 4)


# ---- lazy loading and the checker's light copy ---------------------------------------------------


@pytest.fixture
def small_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make tiny test models "big" for the lazy loader."""
    monkeypatch.setattr(lazyload, "MIN_FILE_BYTES", 0)
    monkeypatch.setattr(lazyload, "LAZY_BYTES", 256)


def test_skeleton_keeps_weights_in_the_file(tmp_path, small_lazy) -> None:  # type: ignore[no-untyped-def]
    model = make_small_cnn(c1=16, c2=32, low_rank=True)
    path = save(model, tmp_path / "m.onnx")
    lazy = load_model(path, lazy=True)
    ext = {t.name for t in lazy.graph.initializer if lazyload.is_external(t)}
    assert ext == {"conv1.W", "conv2.W", "fc.W"}  # the weights; biases are too small
    assert lazy.ByteSize() < model.ByteSize() / 4
    for t in lazy.graph.initializer:
        if t.name in ext:
            ref = onnx.numpy_helper.to_array(next(x for x in model.graph.initializer if x.name == t.name))
            np.testing.assert_array_equal(lazyload.read_array(t, tmp_path), ref)
    lazyload.materialize(lazy, tmp_path)
    assert lazy.SerializeToString() == load_model(path).SerializeToString()


def test_lazy_and_in_memory_compress_write_the_same_bytes(tmp_path, small_lazy) -> None:  # type: ignore[no-untyped-def]
    model = make_small_cnn(c1=16, c2=32, low_rank=True)
    path = save(model, tmp_path / "m.onnx")
    cfg = CompressionConfig(validate=False)
    a = ot.compress(path, cfg, output=tmp_path / "a.onnx")  # lazy: from the file
    b = ot.compress(model, cfg, output=tmp_path / "b.onnx")  # in memory
    assert a.decomposed_layers == 3 and a.plan.layers == b.plan.layers
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert not any(lazyload.is_external(t) for t in a.model.graph.initializer)  # the user gets real tensors


def test_lazy_plan_equals_in_memory_plan(tmp_path, small_lazy) -> None:  # type: ignore[no-untyped-def]
    model = make_small_cnn(c1=16, c2=32, low_rank=True)
    path = save(model, tmp_path / "m.onnx")
    assert ot.plan(path).layers == ot.plan(model).layers


def test_lazy_compress_keeps_excluded_weights_and_validates(tmp_path, small_lazy) -> None:  # type: ignore[no-untyped-def]
    model = make_small_cnn(c1=16, c2=32, low_rank=True)
    path = save(model, tmp_path / "m.onnx")
    res = ot.compress(path, CompressionConfig(exclude="conv2"), output=tmp_path / "out.onnx")
    assert res.validation is not None and res.validation.passed
    out = onnx.load(str(tmp_path / "out.onnx"))
    kept = next(t for t in out.graph.initializer if t.name == "conv2.W")
    orig = next(t for t in model.graph.initializer if t.name == "conv2.W")
    assert kept.SerializeToString() == orig.SerializeToString()  # back inline, byte for byte


def test_weights_feeding_other_ops_are_loaded(tmp_path, small_lazy) -> None:  # type: ignore[no-untyped-def]
    """Only Conv/Gemm/MatMul weights stay in the file: folding and subgraphs see ordinary tensors."""
    model = make_gemm_model(K=64, N=32, trans_b=1)
    extra = onnx.helper.make_node("Identity", ["W"], ["w_copy"], name="id")
    model.graph.node.append(extra)
    model.graph.output.append(onnx.helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, [32, 64]))
    lazy = load_model(save(model, tmp_path / "g.onnx"), lazy=True)
    assert not any(lazyload.is_external(t) for t in lazy.graph.initializer)


def test_checker_light_copy_drops_big_initializers_only() -> None:
    model = make_small_cnn(c1=16, c2=64, low_rank=True)
    import onnx_tucker.graph.load as io

    big = {t.name for t in model.graph.initializer if t.ByteSize() >= 2**14}
    old = io._CHECKER_LIGHT_BYTES
    io._CHECKER_LIGHT_BYTES = 2**14
    try:
        light = light_for_checker(model)
    finally:
        io._CHECKER_LIGHT_BYTES = old
    assert light is not None and big
    assert {t.name for t in light.graph.initializer} == {t.name for t in model.graph.initializer} - big
    assert big <= {i.name for i in light.graph.input}
    onnx.checker.check_model(light)
    assert light_for_checker(make_small_cnn(c1=4, c2=4)) is None  # nothing big: the model itself is checked
