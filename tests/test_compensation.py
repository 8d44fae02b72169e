"""Bias compensation math against direct computations on explicit tokens."""

import pytest
import torch

from optimum_bc.algorithms.compensation import InputMoments, ResidualMean, ResidualMoments
from optimum_bc.algorithms.gptq import gptq_quantize
from optimum_bc.algorithms.rtn import rtn_quantize


def _direct(W: torch.Tensor, Q: torch.Tensor, x_fp: torch.Tensor, x_q: torch.Tensor):
    r = x_fp @ W.T - x_q @ Q.T
    b = r.mean(0)
    return b, (r**2).mean(), ((r - b) ** 2).mean()


@pytest.mark.parametrize("target", ["float", "sequential"])
def test_bias_and_mse_match_direct_computation(target: str) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g, dtype=torch.float64).float()
    Q = rtn_quantize(W, bits=3, group_size=-1, sym=False).dequantize()
    x_fp = torch.randn(500, 40, generator=g) + 0.7
    x_q = x_fp + 0.05 * torch.randn(500, 40, generator=g) + 0.02
    moments = InputMoments(40, target)
    for chunk in range(0, 500, 128):
        moments.add_batch(x_fp[chunk : chunk + 128], x_q[chunk : chunk + 128])
    comp = moments.compensate(W, Q, torch.float32)
    b, before, after = _direct(W, Q, x_fp, x_fp if target == "float" else x_q)
    torch.testing.assert_close(comp.bias, b, rtol=1e-4, atol=1e-5)
    assert comp.mse_before is None  # first moments only: the MSEs come from the streamed residual
    residual = ResidualMoments(24)
    r = x_fp @ W.T - (x_fp if target == "float" else x_q) @ Q.T
    for chunk in range(0, 500, 128):
        residual.add_batch(r[chunk : chunk + 128])
    assert residual.mse() == pytest.approx(float(before), rel=1e-4)
    assert residual.mse(comp.applied) == pytest.approx(float(after), rel=1e-4)
    assert residual.mse(comp.applied) < residual.mse()


def test_float_and_quantized_sums_from_separate_passes_give_the_paired_bias() -> None:
    """The sequential bias needs sum x - sum x̂ over the same tokens, not paired rows: the float inputs added in one
    pass and the quantized ones in another (another batch order) give the paired bias; a pass that missed a batch is
    refused."""
    g = torch.Generator().manual_seed(5)
    W, Q = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    x_fp = torch.randn(90, 10, generator=g) + 0.3
    x_q = x_fp + 0.1 * torch.randn(90, 10, generator=g)
    paired, split = InputMoments(10, "sequential"), InputMoments(10, "sequential")
    paired.add_batch(x_fp, x_q)
    for chunk in range(0, 90, 30):
        split.add_float(x_fp[chunk : chunk + 30])
    for chunk in (60, 0, 30):
        split.add_quant(x_q[chunk : chunk + 30])
    expected = (x_fp @ W.T - x_q @ Q.T).mean(0)
    torch.testing.assert_close(split.compensate(W, Q, torch.float32).bias, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.compensate(W, Q, torch.float32).bias, paired.compensate(W, Q, torch.float32).bias)
    missing = InputMoments(10, "sequential")
    missing.add_float(x_fp)
    missing.add_quant(x_q[:30])
    with pytest.raises(ValueError, match="cover different tokens"):
        missing.compensate(W, Q, torch.float32)


def test_residual_moments_give_the_mse_of_any_bias_per_position_class() -> None:
    g = torch.Generator().manual_seed(6)
    positions = torch.arange(40) % 8
    r = torch.randn(40, 5, generator=g) + 3 * (positions == 0).float()[:, None]
    residual = ResidualMoments(5, classes=2)
    residual.add_batch(r[:25], positions[:25])
    residual.add_batch(r[25:], positions[25:])
    bias = torch.randn(2, 5, generator=g)
    applied = bias[positions.clamp(max=1)]
    assert residual.mse(bias) == pytest.approx(float(((r - applied) ** 2).mean()), rel=1e-5)
    assert residual.mse(bias[1]) == pytest.approx(float(((r - bias[1]) ** 2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="token position"):
        residual.add_batch(r)
    with pytest.raises(ValueError, match="no calibration token"):
        ResidualMoments(5).mse()


def test_bias_is_the_least_squares_optimum() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 16, generator=g)
    Q = rtn_quantize(W, bits=2, group_size=-1, sym=False).dequantize()
    x = torch.randn(300, 16, generator=g) + 1.0
    moments = InputMoments(16, "float")
    moments.add_batch(x)
    b = moments.compensate(W, Q, torch.float32).bias
    r = x @ (W - Q).T
    A = torch.ones(300, 1)
    lstsq = torch.linalg.lstsq(A, r).solution[0]
    torch.testing.assert_close(b, lstsq, rtol=1e-4, atol=1e-5)
    for _ in range(5):
        other = b + 0.01 * torch.randn(8, generator=g)
        assert ((r - b) ** 2).mean() <= ((r - other) ** 2).mean()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("target", ["float", "sequential"])
def test_after_bc_never_exceeds_before_over_many_random_layers(method: str, target: str) -> None:
    g = torch.Generator().manual_seed(2)
    for trial in range(25):
        d_in, d_out = int(torch.randint(8, 80, (1,), generator=g)), int(torch.randint(4, 40, (1,), generator=g))
        bits = [2, 3, 4, 8][trial % 4]
        W = torch.randn(d_out, d_in, generator=g) * (0.1 + trial / 10)
        x_fp = torch.randn(200, d_in, generator=g) * torch.rand(d_in, generator=g) * 3 + torch.randn(d_in, generator=g)
        x_q = x_fp + 0.1 * torch.randn(200, d_in, generator=g)
        if method == "gptq":
            H = 2 * x_q.T @ x_q / 200
            Q = gptq_quantize(W, H, bits=bits, group_size=-1, sym=False).dequantize()
        else:
            Q = rtn_quantize(W, bits=bits, group_size=-1, sym=False).dequantize()
        moments = InputMoments(d_in, target)
        moments.add_batch(x_fp, x_q)
        comp = moments.compensate(W, Q, torch.float32)
        residual = ResidualMoments(d_out)
        residual.add_batch(x_fp @ W.T - (x_fp if target == "float" else x_q) @ Q.T)
        assert residual.mse(comp.applied) <= residual.mse() * (1 + 1e-6)
        _, _, after = _direct(W, Q, x_fp, x_fp if target == "float" else x_q)
        assert residual.mse(comp.applied) == pytest.approx(float(after), rel=1e-2, abs=1e-9)


def test_residual_mean_block_level() -> None:
    target = torch.randn(100, 6)
    output = target - torch.tensor([0.5, -0.2, 0.0, 1.0, 0.3, -0.7]) + 0.01 * torch.randn(100, 6)
    acc = ResidualMean(6)
    acc.add_batch(target[:50], output[:50])
    acc.add_batch(target[50:], output[50:])
    comp = acc.compensate(torch.float32)
    torch.testing.assert_close(comp.bias, (target - output).mean(0))
    assert comp.mse_after < 0.01 * comp.mse_before


def test_errors() -> None:
    with pytest.raises(ValueError, match="bc_target='median'"):
        InputMoments(4, "median")
    with pytest.raises(ValueError, match="no calibration token"):
        InputMoments(4, "float").compensate(torch.ones(2, 4), torch.ones(2, 4), torch.float32)
    with pytest.raises(ValueError, match="quantized prefix"):
        InputMoments(4, "sequential").add_batch(torch.ones(3, 4))


@pytest.mark.parametrize("target", ["float", "sequential"])
def test_position_granularity_matches_per_position_means(target: str) -> None:
    g = torch.Generator().manual_seed(4)
    samples, T, d_in = 30, 8, 12
    W = torch.randn(5, d_in, generator=g)
    Q = rtn_quantize(W, bits=2, group_size=-1, sym=False).dequantize()
    x_fp = torch.randn(samples, T, d_in, generator=g) + torch.linspace(-1, 1, T).unsqueeze(1)
    x_q = x_fp + 0.1 * torch.randn(samples, T, d_in, generator=g)
    moments = InputMoments(d_in, target, positions=T)
    positions = torch.arange(T).repeat(samples)
    moments.add_batch(x_fp.reshape(-1, d_in), x_q.reshape(-1, d_in), positions)
    comp = moments.compensate(W, Q, torch.float32)
    r = x_fp @ W.T - (x_fp if target == "float" else x_q) @ Q.T  # (samples, T, out)
    b = r.mean(0)
    torch.testing.assert_close(comp.bias, b, rtol=1e-4, atol=1e-5)
    residual = ResidualMoments(5, classes=T)
    residual.add_batch(r.reshape(-1, 5), positions)
    assert residual.mse() == pytest.approx(float((r**2).mean()), rel=1e-3)
    assert residual.mse(comp.applied) == pytest.approx(float(((r - b) ** 2).mean()), rel=1e-3)
    channel = InputMoments(d_in, target)
    channel.add_batch(x_fp.reshape(-1, d_in), x_q.reshape(-1, d_in))
    assert residual.mse(comp.applied) <= residual.mse(channel.compensate(W, Q, torch.float32).applied) + 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folding_into_an_existing_bias_rounds_once(dtype: torch.dtype) -> None:
    """bias + compensation is summed in float32 and rounded once; mse_after is that of the stored bias."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(960, 64, generator=g) * 0.05
    Q = rtn_quantize(W, bits=3, group_size=-1, sym=False).dequantize()
    x = torch.randn(400, 64, generator=g) + 0.5
    moments = InputMoments(64, "float")
    moments.add_batch(x)
    base = (torch.randn(960, generator=g) * 3).to(dtype)
    ideal = (x @ (W - Q).T).mean(0)  # the compensation, float32
    comp = moments.compensate(W, Q, dtype, base)
    assert comp.bias.dtype == dtype
    torch.testing.assert_close(comp.bias, (base.float() + ideal).to(dtype), rtol=0, atol=0)
    twice = base + ideal.to(dtype)  # the old fold: the compensation rounded, then the sum rounded again
    error_once = ((comp.bias.float() - base.float()) - ideal).abs() / ideal.abs()
    error_twice = ((twice.float() - base.float()) - ideal).abs() / ideal.abs()
    assert bool((error_once <= error_twice + 1e-6).all())  # never worse
    assert int((error_once < error_twice - 1e-6).sum()) > 0 and float(error_once.mean()) < float(error_twice.mean())
    # applied is what the stored bias adds: the MSE after is that of the stored bias
    torch.testing.assert_close(comp.applied[0], comp.bias.float() - base.float(), rtol=0, atol=0)
    residual = ResidualMoments(960)
    residual.add_batch(x @ (W - Q).T)
    r = x @ (W - Q).T - (comp.bias.float() - base.float())
    assert residual.mse(comp.applied) == pytest.approx(float((r**2).mean()), rel=1e-3)


def test_layer_level_fold_rounds_once_and_reports_what_it_adds() -> None:
    g = torch.Generator().manual_seed(4)
    acc = ResidualMean(512)
    target = torch.randn(300, 512, generator=g)
    output = target - 0.01 * torch.randn(512, generator=g) - 0.003 * torch.randn(300, 512, generator=g)
    acc.add_batch(target, output)
    base = (torch.randn(512, generator=g) * 4).to(torch.bfloat16)
    comp = acc.compensate(torch.bfloat16, base)
    mean_r = (target - output).mean(0)
    torch.testing.assert_close(comp.bias, (base.float() + mean_r).to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(comp.added, comp.bias.float() - base.float(), rtol=0, atol=0)
    r = (target - output) - comp.added
    assert comp.mse_after == pytest.approx(float((r**2).mean()), rel=1e-3)
