"""Least squares that sets aside the rows from outside the model, and the SVD that falls back to LAPACK's
gesvd driver (relux.attack.linalg)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relux.attack.linalg import lstsq, lstsq_dropping_misfits, svd


def _design(seed: int, n: int, k: int, outputs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = np.concatenate([np.maximum(rng.normal(size=(n, k)), 0.0), np.ones((n, 1))], axis=1)
    X = rng.normal(size=(k + 1, outputs))
    return A, X, A @ X


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 12), outputs=st.integers(1, 4),
       share=st.floats(0.005, 0.05))
def test_a_few_rows_from_outside_the_model_are_set_aside(seed: int, k: int, outputs: int, share: float) -> None:
    # Exact data from one linear map, except at a few rows where a feature the design lacks is on (as where
    # a rarely active neuron the layers miss is on): the plain fit is bent at every row, the fit that drops
    # its misfits is the true map again.
    n = 40 * (k + 1)
    A, X, B = _design(seed, n, k, outputs)
    rng = np.random.default_rng(seed + 1)
    bad = rng.choice(n, size=max(1, int(share * n)), replace=False)
    B = B.copy()
    B[bad] += np.abs(rng.normal(size=(bad.size, 1))) * rng.normal(size=(1, outputs))
    got = lstsq_dropping_misfits(A, B, 1e-9)
    # the rows kept are exact equations of a well-conditioned design: rounding only (1e-9 leaves a wide
    # margin for the condition number of a random ReLU design)
    np.testing.assert_allclose(got, X, atol=1e-9 * max(1.0, float(np.abs(X).max())))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), noise=st.sampled_from([0.0, 1e-12, 1e-7]))
def test_clean_or_uniformly_noisy_data_is_the_plain_fit(seed: int, noise: float) -> None:
    # Every row misses by rounding or by the oracle's noise alike: nothing is dropped when the floor is
    # above that noise, so the result is the plain least-squares fit, bit for bit.
    A, _, B = _design(seed, 200, 6, 2)
    B = B + noise * np.random.default_rng(seed + 2).normal(size=B.shape)
    np.testing.assert_array_equal(lstsq_dropping_misfits(A, B, max(1e-9, 1e3 * noise)), lstsq(A, B))


def test_rows_that_alone_see_a_column_are_kept() -> None:
    # A column on at two rows only (a neuron rarely on): dropping those rows would lose the column's
    # coefficient, so the fit stops before the rank falls, even when those rows miss most.
    A, X, B = _design(3, 200, 5, 1)
    A[:, 0] = 0.0
    A[:2, 0] = [1.0, 2.0]
    B = A @ X
    B[10:14] += 1.0  # misfits elsewhere
    got = lstsq_dropping_misfits(A, B, 1e-9)
    assert np.linalg.matrix_rank(A) == A.shape[1]
    # the two rows that see column 0 stay, so its coefficient is determined too (exact rows: rounding)
    np.testing.assert_allclose(got, X, atol=1e-9)


def test_a_rare_column_keeps_the_row_of_it_that_fits() -> None:
    # A column on at two rows only, one of them from outside the model too (two rare neurons on together),
    # and misfits elsewhere: one of those two rows stays for the column (which one the data cannot tell:
    # each alone fits it exactly), and every other coefficient is exact.
    for seed in range(20):
        rng = np.random.default_rng(seed)
        A, X, _ = _design(seed, 200, 6, 1)
        A[:, 0] = 0.0
        A[:2, 0] = rng.uniform(0.5, 2.0, size=2)
        B = A @ X
        bad = rng.choice(np.arange(2, 200), size=8, replace=False)
        B[bad] += rng.normal(size=(8, 1))
        B[1] += 1.0 + abs(rng.normal())
        got = lstsq_dropping_misfits(A, B, 1e-9)
        # exact rows left: rounding only
        np.testing.assert_allclose(got[1:], X[1:], atol=1e-9)
        assert np.isfinite(got[0]).all() and abs(float(got[0, 0])) > 0


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**16), full=st.booleans())
def test_it_is_numpy_s_svd_when_that_converges(rows: int, cols: int, seed: int, full: bool) -> None:
    a = np.random.default_rng(seed).standard_normal((rows, cols))
    U, S, Vt = svd(a, full_matrices=full)
    U0, S0, Vt0 = np.linalg.svd(a, full_matrices=full)
    # the same call underneath: bit for bit
    np.testing.assert_array_equal(S, S0)
    np.testing.assert_array_equal(U, U0)
    np.testing.assert_array_equal(Vt, Vt0)
    np.testing.assert_array_equal(svd(a, compute_uv=False), np.linalg.svd(a, compute_uv=False))


def test_a_finite_matrix_that_numpy_gives_up_on_goes_to_gesvd(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        raise np.linalg.LinAlgError("SVD did not converge")

    a = np.random.default_rng(0).standard_normal((6, 4)) * np.logspace(0, -12, 4)
    S_ref = np.linalg.svd(a, compute_uv=False)
    monkeypatch.setattr(np.linalg, "svd", fails)
    U, S, Vt = svd(a, full_matrices=False)
    # a different algorithm on the same matrix: the factors agree to rounding relative to the largest
    # singular value, and they reproduce the matrix to that level
    np.testing.assert_allclose(S, S_ref, rtol=0, atol=1e-13 * S_ref[0])
    np.testing.assert_allclose((U * S) @ Vt, a, rtol=0, atol=1e-13 * S_ref[0])
    np.testing.assert_allclose(svd(a, compute_uv=False), S_ref, rtol=0, atol=1e-13 * S_ref[0])


def test_a_matrix_with_a_nan_still_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(np.linalg, "svd", fails)
    with pytest.raises(np.linalg.LinAlgError):
        svd(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_a_stack_of_matrices_falls_back_one_matrix_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    a = np.random.default_rng(1).standard_normal((2, 3, 5, 4))
    S_ref = np.linalg.svd(a, compute_uv=False)
    real = np.linalg.svd

    def fails_on_stacks(x: np.ndarray, *args: object, **kwargs: object) -> object:
        if x.ndim > 2:
            raise np.linalg.LinAlgError("SVD did not converge")
        return real(x, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(np.linalg, "svd", fails_on_stacks)
    U, S, Vt = svd(a, full_matrices=False)
    assert U.shape == (2, 3, 5, 4) and S.shape == (2, 3, 4) and Vt.shape == (2, 3, 4, 4)
    # each matrix through numpy's own SVD: equal to the stacked call's values to rounding
    np.testing.assert_allclose(S, S_ref, rtol=1e-14, atol=0)
    np.testing.assert_allclose(np.einsum("...ij,...j,...jk->...ik", U, S, Vt), a, rtol=0, atol=1e-13)
    np.testing.assert_allclose(svd(a, compute_uv=False), S_ref, rtol=1e-14, atol=0)
