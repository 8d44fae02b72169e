"""ERQ (weight part) against slow references solved with torch.linalg.lstsq, and end to end through transformers."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, QuantLinear
from optimum_bc.algorithms.aqer import aqer, aqer_correction, input_statistics
from optimum_bc.algorithms.erq import ERQQuantizer, erq_quantize
from optimum_bc.algorithms.rtn import rtn_quantize
from optimum_bc.formats.activations import ActSpec, quantize_input
from optimum_bc.formats.formats import MX_ELEMENTS, get_format, mx_scale
from optimum_bc.formats.primitives import compute_qparams
from optimum_bc.layers.mxlinear import MXLinear

from .conftest import VOCAB, correlated_inputs, gram


def _ridge_lstsq(A: torch.Tensor, Y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_D ||A D - Y||² + lam ||D||², solved as the augmented least-squares system [A; √lam I] D = [Y; 0]."""
    aug = torch.cat([A, math.sqrt(lam) * torch.eye(A.shape[1], dtype=A.dtype)])
    rhs = torch.cat([Y, torch.zeros(A.shape[1], Y.shape[1], dtype=Y.dtype)])
    return torch.linalg.lstsq(aug, rhs).solution


def test_aqer_is_the_ridge_regression_solution() -> None:
    X = correlated_inputs(256, 24).double()  # float inputs
    A = X + 0.3 * torch.randn_like(X)  # inputs carrying upstream quantization error
    W = torch.randn(10, 24, dtype=torch.float64)
    lam_abs = 5.0
    expected = _ridge_lstsq(A, X @ W.T - A @ W.T, lam_abs).T
    # With the normalised Gram matrices H = 2AᵀA/N the same ridge term is λ = 2 lam_abs / N.
    got = aqer_correction(W, gram(A), gram(A, X), 2 * lam_abs / A.shape[0])
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def _grid_values(w: torch.Tensor, bits: int, format: str) -> list[float]:
    """The sorted values of the grid fitted to the 1-D block ``w`` (asymmetric min-max integer grid, or MX block)."""
    if format == "int":
        qp = compute_qparams(w.float().unsqueeze(0), bits, False)
        return [float(qp.scale) * (k - float(qp.zero)) for k in range(qp.maxq + 1)]
    element = MX_ELEMENTS[format]
    scale = float(mx_scale(w.float().unsqueeze(0), element))
    values = {v for v in element.values.tolist() if math.isfinite(v) and abs(v) <= element.max_normal}
    return sorted(scale * v for v in values)


def _reference_wqer(
    A: torch.Tensor,
    w: torch.Tensor,
    bits: int,
    lam_rel: float,
    chunk: float,
    group_size: int = -1,
    format: str = "int",
) -> torch.Tensor:
    """ERQ's Wqer written out per row: the grid points bracketing each weight, the explicit proxy δᵀCδ, ridge by
    augmented lstsq. Returns the quantized values."""
    A, w = A.double(), w.double()
    N, n = A.shape
    size = n if group_size == -1 else group_size
    C = A.T @ A / N  # E[a aᵀ] = μμᵀ + Σ
    lam_abs = lam_rel * float(torch.diagonal(2 * A.T @ A / N).mean()) * N / 2
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        grids = [_grid_values(w[r, s : s + size], bits, format) for s in range(0, n, size)]
        row = w[r].clone()
        done = 0
        while done < n:
            k = max(1, int(chunk * (n - done)))
            S = list(range(done, done + k))
            lo, hi, q = [], [], []
            for j in S:
                grid, x = grids[j // size], float(row[j])
                lo.append(max([v for v in grid if v <= x], default=grid[0]))
                hi.append(min([v for v in grid if v >= x], default=grid[-1]))
                q.append(min(grid, key=lambda v: abs(v - x)))
            delta = torch.tensor([q[i] - float(row[j]) for i, j in enumerate(S)], dtype=torch.float64)
            Cs = C[S][:, S]
            for _ in range(100):
                g = 2 * Cs @ delta
                cand = [i for i in range(k) if torch.sign(g[i]) == torch.sign(delta[i])]
                if not cand:
                    break
                i = max(cand, key=lambda i: float(g[i].abs()))
                options = [(v - float(row[S[i]]), v) for v in (lo[i], hi[i])]
                new_delta, new_value = min(options, key=lambda o: abs(o[0] - float(delta[i] - g[i])))
                trial = delta.clone()
                trial[i] = new_delta
                if float(trial @ Cs @ trial) >= float(delta @ Cs @ delta):
                    break
                delta, q[i] = trial, new_value
            out[r, done : done + k] = torch.tensor(q, dtype=torch.float64)
            if done + k < n:
                R = list(range(done + k, n))
                row[R] += _ridge_lstsq(A[:, R], -(A[:, S] @ delta).unsqueeze(1), lam_abs)[:, 0]
            done += k
    return out


@pytest.mark.parametrize("bits,chunk,lam", [(3, 0.5, 0.01), (2, 0.5, 0.1), (4, 0.25, 0.01)])
def test_wqer_matches_reference(bits: int, chunk: float, lam: float) -> None:
    A = correlated_inputs(128, 20, seed=bits)
    w = torch.randn(4, 20, generator=torch.Generator().manual_seed(3))
    qw = erq_quantize(w, gram(A), None, bits=bits, group_size=-1, sym=False, lam=lam, chunk=chunk)
    torch.testing.assert_close(qw.dequantize().double(), _reference_wqer(A, w, bits, lam, chunk), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mxfp4", "mxint4", "mxfp6_e3m2"])
def test_wqer_mx_matches_reference(name: str) -> None:
    A = correlated_inputs(160, 64, seed=2)
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    bits = MX_ELEMENTS[name].bits
    qw = erq_quantize(w, gram(A), None, bits=bits, group_size=32, sym=True, format=name)
    assert qw.format == name
    expected = _reference_wqer(A, w, bits, 0.01, 0.5, group_size=32, format=name)
    torch.testing.assert_close(qw.dequantize().double(), expected, rtol=0, atol=0)
    layer = MXLinear.from_quantized(qw.codes, qw.scales, name)
    assert torch.equal(layer.dequantize_weight(), qw.dequantize())
    err = lambda q: float(((A @ (w - q).T) ** 2).mean())  # noqa: E731
    assert err(qw.dequantize()) < err(rtn_quantize(w, bits=bits, group_size=32, sym=True, format=name).dequantize())


def test_format_step_walks_the_sorted_values() -> None:
    for name, element in MX_ELEMENTS.items():
        fmt = get_format(name, element.bits)
        table = element.ordered
        assert float(table[0]) == -element.max_normal and float(table[-1]) == element.max_normal
        codes = element.encode(table).float()
        up = fmt.step(codes, torch.ones_like(codes))
        down = fmt.step(codes, -torch.ones_like(codes))
        assert torch.equal(element.decode(up), torch.cat([table[1:], table[-1:]])), name
        assert torch.equal(element.decode(down), torch.cat([table[:1], table[:-1]])), name
        assert torch.equal(element.decode(fmt.step(codes, torch.zeros_like(codes))), table)
    fmt = get_format("int", 3)
    codes = torch.arange(8.0)
    assert torch.equal(fmt.step(codes, torch.ones_like(codes)), torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 7]))


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 32), (2, 16)])
def test_erq_beats_rtn_on_correlated_inputs(bits: int, group_size: int) -> None:
    X = correlated_inputs(2048, 64)
    w = torch.randn(32, 64)

    def err(qw) -> float:
        return float(((X @ (w - qw.dequantize()).T) ** 2).mean())

    erq = err(erq_quantize(w, gram(X), None, bits=bits, group_size=group_size, sym=True))
    assert erq < 0.9 * err(rtn_quantize(w, bits=bits, group_size=group_size, sym=True))


def test_aqer_lowers_error_against_float_outputs() -> None:
    X = correlated_inputs(2048, 64, seed=5)
    A = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(6))
    w = torch.randn(16, 64)

    def err(qw) -> float:
        return float(((A @ qw.dequantize().T - X @ w.T) ** 2).mean())

    with_aqer = erq_quantize(w, gram(A), gram(A, X), bits=4, group_size=-1, sym=False)
    without = erq_quantize(w, gram(A), None, bits=4, group_size=-1, sym=False)
    assert err(with_aqer) < 0.95 * err(without)


@pytest.mark.parametrize("act_bits", [4, 6])
def test_aqer_then_wqer_beats_wqer_alone_with_activation_quantization(act_bits: int) -> None:
    """Inputs fake-quantized per tensor (the packed layer's input quantizer); the error is measured against the float
    output on the calibration tokens and on held-out tokens of the same distribution."""
    X = correlated_inputs(4096, 64, seed=7) + 0.5  # a shifted input, as after a LayerNorm with a bias
    spec = ActSpec(act_bits, sym=False, granularity="tensor", dynamic=True)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    calib, held = X[:2048], X[2048:]
    H, C = input_statistics(calib, quantize_input(calib, spec))

    def err(qw, x: torch.Tensor) -> float:
        return float(((quantize_input(x, spec) @ qw.dequantize().T - x @ w.T) ** 2).mean())

    with_aqer = erq_quantize(w, H, C, bits=4, group_size=-1, sym=False)
    wqer_only = erq_quantize(w, H, None, bits=4, group_size=-1, sym=False)
    for x in (calib, held):
        assert err(with_aqer, x) < 0.95 * err(wqer_only, x)


@pytest.mark.parametrize("seed", [0, 1])
def test_few_calibration_tokens_need_a_stronger_ridge(seed: int) -> None:
    """The ridge trades fitting the calibration tokens against their noise: on held-out tokens, with 2 tokens per
    input dimension (as a few calibration images give) λ = 0.3 beats 0.01; with 64 per dimension (text windows)
    0.01 wins. Why ``erq_lambda=None`` is stronger for image models (1.0) than for text (0.01)."""
    spec = ActSpec(4, sym=False, granularity="tensor", dynamic=True)
    X = correlated_inputs(8192, 64, seed=seed)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(100 + seed))
    held = X[4096:]

    def held_error(tokens: int, lam: float) -> float:
        calib = X[:tokens]
        H, C = input_statistics(calib, quantize_input(calib, spec))
        Q = erq_quantize(w, H, C, bits=4, group_size=-1, sym=False, lam=lam).dequantize()
        return float(((quantize_input(held, spec) @ Q.T - held @ w.T) ** 2).mean())

    assert held_error(128, 0.3) < 0.95 * held_error(128, 0.01)
    assert held_error(4096, 0.01) < 0.95 * held_error(4096, 0.3)


def test_aqer_with_infinite_ridge_is_the_identity() -> None:
    X = correlated_inputs(512, 32, seed=9)
    Xq = quantize_input(X, ActSpec(4, sym=False, granularity="tensor", dynamic=True))
    H, C = input_statistics(X, Xq)
    w = torch.randn(8, 32)
    assert float((aqer(w, H, C, lam=1e-2) - w).abs().max()) > 1e-3  # it does move the weight at the default
    torch.testing.assert_close(aqer(w, H, C, lam=1e12), w, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="erq_lambda > 0"):
        aqer_correction(w, H, C, 0.0)


def test_aqer_input_statistics_are_the_gram_matrices() -> None:
    X, Xq = torch.randn(3, 40, 8), torch.randn(3, 40, 8)
    H, C = input_statistics(X, Xq)
    torch.testing.assert_close(H, gram(Xq.reshape(-1, 8)))
    torch.testing.assert_close(C, gram(Xq.reshape(-1, 8), X.reshape(-1, 8)))


def test_erq_quantizer_accumulates_the_cross_gram() -> None:
    A, X = torch.randn(100, 8), torch.randn(100, 8)
    quantizer = ERQQuantizer(8, bits=4, group_size=-1, sym=False)
    for s in (slice(0, 30), slice(30, 100)):
        quantizer.add_batch(A[s])
        quantizer.add_float_batch(A[s], X[s])
    torch.testing.assert_close(quantizer.hessian(torch.device("cpu")), gram(A))
    torch.testing.assert_close(quantizer.cross.float() * 2 / quantizer.num_tokens, gram(A, X))


@pytest.mark.parametrize(
    "field,value", [("erq_lambda", 0), ("erq_lambda", -1.0), ("erq_chunk", 0.0), ("erq_chunk", 1.5)], ids=str
)
def test_erq_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field}="):
        BCQuantizationConfig(method="erq", **{field: value})


@pytest.mark.parametrize("bc", [False, True], ids=["no-bc", "bc"])
def test_erq_end_to_end_save_reload(tiny_model_dir: str, calib_ids, tmp_path, monkeypatch, bc: bool) -> None:
    calls = []
    original = ERQQuantizer.add_float_batch

    def spy(self, x: torch.Tensor, x_float: torch.Tensor) -> None:
        calls.append(bool(torch.equal(x, x_float)))
        original(self, x, x_float)

    monkeypatch.setattr(ERQQuantizer, "add_float_batch", spy)
    config = BCQuantizationConfig(
        bits=3,
        group_size=32,
        method="erq",
        bias_compensation=bc,
        dataset=calib_ids,
        num_samples=16,
        seq_len=32,
        batch_size=4,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config)
    assert len([m for m in model.modules() if isinstance(m, QuantLinear)]) in (12, 14)
    # Float inputs reach every quantizer even without BC; after the first stage they differ from the quantized ones.
    assert calls and not all(calls)
    for row in model.quantization_report.layers:
        if bc:
            assert row.mse_after <= row.mse_before
    x = torch.randint(0, VOCAB, (2, 20))
    logits = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded(x).logits, logits)
