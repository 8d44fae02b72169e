"""COMQ against a slow, obviously-correct reference, and end to end through transformers."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, QuantLinear
from optimum_bc.algorithms import get_algorithm
from optimum_bc.algorithms.comq import _update_scales, comq_quantize
from optimum_bc.algorithms.gptq import gptq_quantize
from optimum_bc.algorithms.grid import GroupGrid, check_group_size
from optimum_bc.algorithms.rtn import rtn_quantize
from optimum_bc.cli import main
from optimum_bc.formats.formats import MX_ELEMENTS, e8m0_to_scale, mx_scale, scale_to_e8m0
from optimum_bc.formats.primitives import compute_qparams
from optimum_bc.layers.mxlinear import MXLinear

from .conftest import VOCAB, correlated_inputs, gram


def _grid_points(w: torch.Tensor, bits: int, sym: bool, format: str) -> list[tuple[int, float]]:
    """Every (code, value) of the grid fitted to the 1-D block ``w``: the min-max integer grid or an MX block."""
    if format == "int":
        qp = compute_qparams(w.float().unsqueeze(0), bits, sym)
        return [(k, float(qp.scale) * (k - float(qp.zero))) for k in range(qp.maxq + 1)]
    element = MX_ELEMENTS[format]
    scale = float(mx_scale(w.float().unsqueeze(0), element))
    # MX integers use the symmetric range: the most negative two's complement code is never produced.
    usable = [v for v in element.values.tolist() if math.isfinite(v) and v >= -element.max_normal]
    return [(k, scale * v) for k, v in enumerate(element.values.tolist()) if v in usable]


def _reference_comq(
    X: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, sym: bool, sweeps: int, format: str = "int"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, per coordinate in greedy order: try every grid point and keep the one with the least ||X(w - q)||².

    Returns the codes and their values.
    """
    X, w = X.double(), w.double()
    n = w.shape[1]
    size = n if group_size == -1 else group_size
    codes, values = torch.zeros_like(w), torch.zeros_like(w)
    for r in range(w.shape[0]):
        grids = [_grid_points(w[r, s : s + size], bits, sym, format) for s in range(0, n, size)]
        q = w[r].clone()
        order = sorted(range(n), key=lambda j: -float(w[r, j].abs() * X[:, j].norm()))
        for _ in range(sweeps):
            for j in order:
                best, best_err = None, None
                for k, v in grids[j // size]:
                    q[j] = v
                    err = float(((X @ (w[r] - q)) ** 2).sum())
                    if best_err is None or err < best_err:
                        best, best_err = (k, v), err
                codes[r, j], q[j] = best
        values[r] = q
    return codes, values


@pytest.mark.parametrize(
    "bits,group_size,sym,sweeps",
    [(2, -1, False, 1), (3, -1, True, 1), (3, 8, False, 1), (4, 8, True, 1), (3, -1, False, 2), (8, 8, False, 1)],
)
def test_comq_matches_brute_force_reference(bits: int, group_size: int, sym: bool, sweeps: int) -> None:
    X = correlated_inputs(64, 16, seed=bits)
    w = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    expected, _ = _reference_comq(X, w, bits, group_size, sym, sweeps)
    for block_size in (5, 64):  # several lazy blocks (the last one partial), and a single one
        qw = comq_quantize(w, gram(X), bits=bits, group_size=group_size, sym=sym, sweeps=sweeps, block_size=block_size)
        assert torch.equal(qw.codes.double(), expected)
    residual = (w - qw.dequantize()).double()
    loss = ((X.double() @ residual.T) ** 2).sum(dim=0) / X.shape[0]
    torch.testing.assert_close(qw.row_losses.double(), loss, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mxfp4", "mxint4", "mxfp6_e2m3", "mxfp8_e4m3"])
def test_comq_mx_matches_brute_force_reference(name: str) -> None:
    X = correlated_inputs(96, 64, seed=1)
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    bits = MX_ELEMENTS[name].bits
    _, expected = _reference_comq(X, w, bits, 32, True, 1, format=name)
    for block_size in (7, 64):
        qw = comq_quantize(w, gram(X), bits=bits, group_size=32, sym=True, block_size=block_size, format=name)
        assert qw.format == name
        assert torch.equal(qw.dequantize().double(), expected)
    # The codes are on the grid the stored scales describe, so the packed layer reproduces them exactly.
    layer = MXLinear.from_quantized(qw.codes, qw.scales, name)
    assert torch.equal(layer.dequantize_weight(), qw.dequantize())


def _dense_update_comq(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    sweeps: int,
    update_scale: bool,
    format: str,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The implementation before the O(rows · in²) rewrite, kept here only as the reference: after each block of 64
    steps, ``G`` is brought up to date with the dense ``rows x in x in`` product of the block's changes
    (``O(rows · in³ / 64)`` per sweep). Returns codes, scales and row losses."""
    check_group_size("COMQ", format, bits, sym, group_size)
    W, H = weight.float(), H.float()
    rows, n = W.shape
    grid = GroupGrid.fit(W, bits=bits, group_size=group_size, sym=sym, format=format)
    order = torch.argsort(W.abs() * torch.diagonal(H).clamp(min=0).sqrt(), dim=1, descending=True)
    codes = torch.zeros(rows, n)
    residual = torch.zeros_like(W)
    for _ in range(sweeps):
        G = residual @ H
        for t0 in range(0, n, block_size):
            J = order[:, t0 : t0 + block_size]
            w, r, g = W.gather(1, J), residual.gather(1, J), G.gather(1, J)
            Hb = torch.take(H, J.unsqueeze(2) * n + J.unsqueeze(1))
            h = torch.diagonal(Hb, dim1=1, dim2=2)
            codes_b, delta = torch.zeros_like(w), torch.zeros_like(w)
            for t in range(J.shape[1]):
                h_t = h[:, t]
                target = torch.where(h_t > 0, w[:, t] + (g[:, t] - h_t * r[:, t]) / h_t.clamp(min=1e-30), w[:, t])
                cols = J[:, t : t + 1]
                code = grid.nearest(target.unsqueeze(1), cols)
                d = w[:, t] - grid.value(code, cols)[:, 0] - r[:, t]
                codes_b[:, t], delta[:, t] = code[:, 0], d
                r[:, t] += d
                g += d.unsqueeze(1) * Hb[:, t]
            codes.scatter_(1, J, codes_b)
            residual.scatter_add_(1, J, delta)
            G += torch.zeros_like(W).scatter_(1, J, delta) @ H
        if update_scale:
            grid = _update_scales(W, H, grid, codes)
            residual = W - grid.value(codes, grid.all_columns(rows))
    return codes, grid.scales, ((residual @ H) * residual).sum(dim=1) / 2


@pytest.mark.parametrize(
    "rows,n,bits,group_size,format,update_scale,sweeps",
    [
        (64, 256, 4, -1, "int", False, 1),
        (64, 256, 3, 64, "int", True, 2),
        (48, 320, 2, 32, "int", False, 2),
        (33, 100, 4, 20, "int", True, 1),
        (64, 256, 4, 32, "mxfp4", True, 1),
        (64, 256, 4, 32, "mxint4", False, 2),
        (40, 192, 8, 32, "mxfp8_e4m3", True, 2),
        (128, 1024, 4, 128, "int", False, 1),
    ],
    ids=str,
)
def test_comq_equals_the_dense_update_implementation(
    rows: int, n: int, bits: int, group_size: int, format: str, update_scale: bool, sweeps: int
) -> None:
    """The blocked implementation sums the terms of ``G`` in another order than the dense one, which can flip a code
    only where a target sits within float32 rounding of a decision boundary (a tie). Codes and scales must agree in
    at least 99.9 % of the entries and the layer loss to 1e-5 relative; each row's loss to rounding (the blocked
    losses come from the ``G`` kept current, not from a new product)."""
    X = correlated_inputs(4 * n, n, seed=n)
    X[:, ::37] *= 20  # outlier channels: the greedy order then differs strongly between rows
    H = gram(X)
    w = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
    sym = format != "int"
    options = {"bits": bits, "group_size": group_size, "sym": sym, "sweeps": sweeps, "update_scale": update_scale}
    options["format"] = format
    codes, scales, losses = _dense_update_comq(w, H, **options)
    for block_size in (32, 64, 7):
        qw = comq_quantize(w, H, block_size=block_size, **options)
        assert float((qw.codes.float() == codes).float().mean()) >= 0.999
        assert float((qw.scales == scales).float().mean()) >= 0.999
        assert abs(float(qw.row_losses.sum()) / float(losses.sum()) - 1) <= 1e-5
        torch.testing.assert_close(qw.row_losses, losses, rtol=1e-4, atol=1e-6)


def test_comq_blocked_update_matches_dense_on_a_large_random_layer() -> None:
    """The same agreement on a layer big enough for many blocks and tiles (several 64-column tiles of ``H``, 32 steps
    per block, rows in the hundreds), with random inputs that have outlier channels."""
    X = correlated_inputs(1024, 320, seed=11)
    X[:, ::29] *= 15
    H = gram(X)
    w = torch.randn(200, 320, generator=torch.Generator().manual_seed(12))
    options = {"bits": 4, "group_size": 64, "sym": False, "sweeps": 1, "update_scale": False, "format": "int"}
    codes, _, losses = _dense_update_comq(w, H, **options)
    qw = comq_quantize(w, H, **options)
    assert float((qw.codes.float() == codes).float().mean()) >= 0.999
    assert abs(float(qw.row_losses.sum()) / float(losses.sum()) - 1) <= 1e-5
    residual = (w - qw.dequantize()).double()
    exact = ((residual @ H.double()) * residual).sum(dim=1) / 2  # the losses kept in G equal a fresh product
    torch.testing.assert_close(qw.row_losses.double(), exact, rtol=1e-4, atol=1e-6)


def _tile64_comq(
    weight: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int, sym: bool, sweeps: int,
    update_scale: bool, format: str, block_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The blocked implementation as it was before the tile width depended on ``in`` (always 64-column tiles of
    ``H`` and ``G``), kept here only as the reference for it. Returns codes, scales and row losses."""
    W, H = weight.float(), H.float().contiguous()
    rows, n = W.shape
    grid = GroupGrid.fit(W, bits=bits, group_size=group_size, sym=sym, format=format)
    diag = torch.diagonal(H).contiguous()
    order = torch.argsort(W.abs() * diag.clamp(min=0).sqrt(), dim=1, descending=True)
    visits = order.T.to(torch.int32).contiguous()
    w_seq, r_seq = W.gather(1, order).T.contiguous(), torch.zeros(n, rows)
    codes_seq = torch.empty(n, rows)

    def tiles(M: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(M.shape[0], -(-n // 64) * 64)
        padded[:, :n] = M
        return padded.view(M.shape[0], -1, 64).transpose(0, 1).contiguous()

    H_tiles, G = tiles(H), torch.zeros(-(-n // 64), rows, 64)
    positions = (visits >> 6) * (rows * 64) + (visits & 63) + torch.arange(rows, dtype=torch.int32) * 64
    for sweep in range(sweeps):
        for t0 in range(0, n, block_size):
            Jt = visits[t0 : t0 + block_size]
            b = Jt.shape[0]
            g = G.view(-1).index_select(0, positions[t0 : t0 + block_size].reshape(-1)).view(Jt.shape)
            r = r_seq[t0 : t0 + block_size] if sweep > 0 else None
            h = diag.index_select(0, Jt.view(-1)).view(Jt.shape)
            groups = grid.g_idx.index_select(0, Jt.view(-1)).view(Jt.shape)
            scales, zeros = grid.scales.T.gather(0, groups), grid.zeros.T.gather(0, groups)
            hc = torch.where(h > 0, h.clamp(min=1e-30), torch.inf)
            hr = h * r if r is not None else None
            deltas = []
            for t in range(b):
                g_t = g[t] if r is None else g[t] - hr[t]
                code = grid.fmt.grid(scales[t], zeros[t]).quantize(torch.addcdiv(w_seq[t0 + t], g_t, hc[t]))
                d = w_seq[t0 + t] - grid.fmt.decode(code, scales[t], zeros[t])
                if r is not None:
                    d -= r[t]
                codes_seq[t0 + t] = code
                deltas.append(d)
                if t + 1 < b:
                    flat = Jt[t] * n + Jt[t + 1 :]
                    g[t + 1 :].addcmul_(H.view(-1).index_select(0, flat.view(-1)).view(flat.shape), d)
            delta = torch.stack(deltas)
            r_seq[t0 : t0 + block_size] += delta
            J, dT = Jt.T.contiguous(), delta.T.contiguous()
            for G_k, H_k in zip(G, H_tiles, strict=True):
                G_k += torch.nn.functional.embedding_bag(J, H_k, per_sample_weights=dT, mode="sum")
        codes = torch.empty_like(W).scatter_(1, order, codes_seq.T.contiguous())
        if update_scale:
            grid = _update_scales(W, H, grid, codes)
        if update_scale or sweep + 1 < sweeps:
            residual = W - grid.value(codes, grid.all_columns(rows))
            r_seq, G = residual.gather(1, order).T.contiguous(), tiles(residual @ H)
    residual = torch.empty_like(W).scatter_(1, order, r_seq.T.contiguous())
    G_full = G.transpose(0, 1).reshape(rows, -1)[:, :n]
    return codes, grid.scales, (G_full * residual).sum(dim=1) / 2


@pytest.mark.parametrize(
    "rows,n,bits,group_size,format,update_scale,sweeps",
    [
        (96, 1024, 4, 128, "int", False, 1),  # 256-column tiles
        (64, 2000, 3, 128, "int", True, 2),  # 128-column tiles, the last one padded
        (40, 100, 4, 20, "int", False, 2),  # one padded 128-column tile
        (48, 512, 4, 32, "mxfp4", True, 1),
        (33, 320, 8, 32, "mxint8", False, 1),
    ],
    ids=str,
)
def test_comq_equals_the_64_column_tile_implementation(
    rows: int, n: int, bits: int, group_size: int, format: str, update_scale: bool, sweeps: int
) -> None:
    """The tile width only groups the columns of each update of ``G``; every entry adds the same terms in the same
    order, so codes, scales and losses are bit-identical to the 64-column tiles, for every block size."""
    X = correlated_inputs(2 * n, n, seed=n)
    X[:, ::37] *= 20
    H = gram(X)
    w = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
    options = {"bits": bits, "group_size": group_size, "sym": format != "int", "sweeps": sweeps}
    options |= {"update_scale": update_scale, "format": format}
    for block_size in (32, 7):
        codes, scales, losses = _tile64_comq(w, H, block_size=block_size, **options)
        qw = comq_quantize(w, H, block_size=block_size, **options)
        assert torch.equal(qw.codes.float(), codes)
        assert torch.equal(qw.scales, scales)
        assert torch.equal(qw.row_losses, losses)


@pytest.mark.parametrize("name", ["mxfp4", "mxint4"])
def test_comq_mx_beats_rtn_and_scale_update_stays_on_powers_of_two(name: str) -> None:
    X = correlated_inputs(2048, 64)
    w = torch.randn(32, 64)
    H = gram(X)
    bits = MX_ELEMENTS[name].bits

    def err(qw) -> float:
        return float(((X @ (w - qw.dequantize()).T) ** 2).mean())

    rtn = rtn_quantize(w, bits=bits, group_size=32, sym=True, format=name)
    fixed = comq_quantize(w, H, bits=bits, group_size=32, sym=True, sweeps=2, format=name)
    updated = comq_quantize(w, H, bits=bits, group_size=32, sym=True, sweeps=2, update_scale=True, format=name)
    assert err(fixed) < 0.9 * err(rtn)
    assert updated.loss <= fixed.loss * (1 + 1e-6)  # equal scales: the two losses differ only in summation order
    assert torch.equal(e8m0_to_scale(scale_to_e8m0(updated.scales)), updated.scales)  # still 2^E: E8M0 storable


@pytest.mark.parametrize("name", ["mxfp4", "mxint8"])
def test_mx_scale_update_finds_the_better_power_of_two(name: str) -> None:
    """With codes fixed and weights exactly twice their values, the best storable scale is twice the fitted one.

    The update visits one group at a time, so the Gram matrix must not couple the two 32-column groups: with
    coupling, group 0 is chosen while group 1 still has its old scale, and the cross term can make another power of
    two better for that step (44 of 120 random draws, before the coupling was removed).
    """
    H = gram(correlated_inputs(512, 64, seed=3))
    H[:32, 32:] = 0
    H[32:, :32] = 0
    for seed in range(20):
        w0 = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
        grid = GroupGrid.fit(w0, bits=MX_ELEMENTS[name].bits, group_size=32, sym=True, format=name)
        cols = grid.all_columns(8)
        codes = grid.nearest(w0, cols)
        updated = _update_scales(2 * grid.value(codes, cols), H, grid, codes)
        assert torch.equal(updated.scales, 2 * grid.scales), seed


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 32), (2, 16)])
def test_comq_beats_rtn_and_more_sweeps_do_not_hurt(bits: int, group_size: int) -> None:
    X = correlated_inputs(2048, 64)
    w = torch.randn(32, 64)
    H = gram(X)

    def err(qw) -> float:
        return float(((X @ (w - qw.dequantize()).T) ** 2).mean())

    rtn = err(rtn_quantize(w, bits=bits, group_size=group_size, sym=False))
    one = err(comq_quantize(w, H, bits=bits, group_size=group_size, sym=False))
    three = err(comq_quantize(w, H, bits=bits, group_size=group_size, sym=False, sweeps=3))
    gptq = err(gptq_quantize(w, H, bits=bits, group_size=group_size, sym=False))
    assert one < 0.9 * rtn
    assert three <= one * (1 + 1e-5)
    assert one < 1.2 * gptq


def test_comq_update_scale_is_the_least_squares_scale_and_lowers_error() -> None:
    X = correlated_inputs(1024, 32, seed=2)
    w = torch.randn(6, 32)
    H = gram(X)
    fixed = comq_quantize(w, H, bits=3, group_size=-1, sym=False)
    updated = comq_quantize(w, H, bits=3, group_size=-1, sym=False, update_scale=True)
    assert torch.equal(updated.codes, fixed.codes)  # one sweep: codes first, then the scale for those codes
    assert updated.loss < fixed.loss
    for r in range(6):
        v = X.double() @ (updated.codes[r].double() - updated.zeros[r, 0].double())
        best = torch.linalg.lstsq(v.unsqueeze(1), (X.double() @ w[r].double()).unsqueeze(1)).solution.item()
        assert abs(updated.scales[r, 0].item() - best) <= abs(best) * 2**-10  # float16 storage rounding
    grouped = [comq_quantize(w, H, bits=3, group_size=8, sym=True, sweeps=2, update_scale=u) for u in (False, True)]
    assert grouped[1].loss < grouped[0].loss
    assert not torch.equal(grouped[1].scales, grouped[0].scales)


def test_comq_stacked_rows_equal_separate_and_dead_inputs_stay_finite() -> None:
    X = correlated_inputs(512, 48, seed=4)
    X[:, 5] = 0.0
    H = gram(X)
    a, b = torch.randn(8, 48), torch.randn(4, 48)
    stacked = comq_quantize(torch.cat([a, b]), H, bits=4, group_size=16, sym=False)
    alone = comq_quantize(b, H, bits=4, group_size=16, sym=False)
    assert torch.equal(stacked.rows(8, 12).codes, alone.codes)
    assert torch.isfinite(stacked.dequantize()).all() and torch.isfinite(stacked.row_losses).all()


def test_comq_quantizer_needs_inputs() -> None:
    quantizer = get_algorithm("comq")(16, bits=4, group_size=-1, sym=False)
    with pytest.raises(ValueError, match="needs calibration inputs"):
        quantizer.quantize(torch.randn(4, 16))


@pytest.mark.parametrize(
    "field,value", [("comq_sweeps", 0), ("comq_sweeps", 1.5), ("comq_update_scale", "yes")], ids=str
)
def test_comq_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field}="):
        BCQuantizationConfig(method="comq", **{field: value})


@pytest.mark.parametrize("method", ["comq", "erq"])
def test_missing_dataset_fails_before_loading(tiny_model_dir: str, method: str) -> None:
    config = BCQuantizationConfig(method=method, bias_compensation=False)
    with pytest.raises(ValueError, match=f"dataset=None but method='{method}'"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config)


@pytest.mark.parametrize(
    "flags,match", [(["--comq-sweeps", "0"], "comq_sweeps=0"), (["--erq-lambda", "-1"], "erq_lambda=-1.0")]
)
def test_cli_method_options_reach_the_config(flags: list[str], match: str, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "m", "--output", "o", "--method", "comq", *flags]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("bc", [False, True], ids=["no-bc", "bc"])
def test_comq_end_to_end_save_reload(tiny_model_dir: str, calib_ids, tmp_path, bc: bool) -> None:
    config = BCQuantizationConfig(
        bits=3,
        group_size=32,
        method="comq",
        comq_sweeps=2,
        comq_update_scale=True,
        bias_compensation=bc,
        dataset=calib_ids,
        num_samples=16,
        seq_len=32,
        batch_size=4,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config)
    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) in (12, 14)
    for row in model.quantization_report.layers:
        assert row.loss > 0
        if bc:
            assert row.mse_after <= row.mse_before
    x = torch.randint(0, VOCAB, (2, 20))
    logits = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded(x).logits, logits)
    saved = reloaded.config.quantization_config
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    assert saved["method"] == "comq" and saved["comq_sweeps"] == 2 and saved["comq_update_scale"] is True
