"""ERQ's Aqer (Zhong et al., ICML 2024, arXiv 2407.06794): the weight update that cancels a layer's input error.

A quantized Linear sees ``x̃`` (its input quantized, and carried through the quantized blocks upstream) where the float
model sees ``x``. Aqer moves the float weight so that the layer fed by ``x̃`` reproduces the float output, by ridge
regression over the calibration tokens (rows of ``X`` and ``X̃``)::

    δW = argmin ||X Wᵀ - X̃ (W + δW)ᵀ||² + λ N ||δW||²
    δWᵀ = (X̃ᵀX̃ / N + λ I)⁻¹ (X̃ᵀX - X̃ᵀX̃) / N · Wᵀ = (H + λ' I)⁻¹ (C - H) Wᵀ

with the streamed statistics ``H = 2 X̃ᵀX̃ / N`` (the GPTQ Hessian of the quantized stream) and ``C = 2 X̃ᵀX / N``
(``λ' = 2 λ``). Only ``E[x̃ x̃ᵀ]`` and ``E[x̃ xᵀ]`` are needed, so no activation is kept.

**λ.** ``lam`` is relative to ``mean(diag H)`` (the mean input power), like GPTQ's dampening, so it does not depend on
the activation scale: ``λ' = lam · mean(diag H)``. ``BCQuantizationConfig.erq_lambda`` is that number, shared with
Wqer's ridge steps as in the reference (whose absolute ``λ = 0.1 · coe = 2000`` is tied to its unnormalised ViT Gram
matrices and 32-image batch). With ``λ → 0`` the update fits the calibration tokens' quantization noise (``H`` is
ill-conditioned along low-power input directions, and ``δW`` there is large and does not transfer to new inputs); with
``λ → ∞`` it vanishes (``δW → 0``: plain quantization). How much ridge pays depends on how many independent tokens
the statistics hold per input dimension: text models (many windows of many tokens) take 0.01, which damps the
directions whose power is below 1 % of the mean, as GPTQ's ``damp_percent=0.01`` does; image models (a few
thousand strongly correlated tokens from 16-32 images) take 1.0: on DINOv2-S at W4A4 with 16 images, 0.01 gave
16 dB SQNR on the calibration images and 3.4 dB on held-out photos, 1.0 gave 5.8 dB held out (``erq_lambda=None``
picks by model; ``optimum_bc.vision.calibrate.VISION_ERQ_LAMBDA``).

The reference appends a ones column to ``X̃`` so that the bias also absorbs the mean error; here that job is bias
compensation's (``bias_compensation=True``), which is exactly that mean correction and sees the Aqer-corrected weight.
"""

import torch


def ridge_solve(H: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    """``(H + λI)⁻¹ B`` with ``H`` symmetric positive semi-definite and ``λ > 0`` (absolute)."""
    Hd = H.clone()
    Hd.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(Hd)
    if info.item() != 0:
        return torch.linalg.lstsq(Hd, B).solution
    return torch.cholesky_solve(B, L)


def relative_ridge(H: torch.Tensor, lam: float) -> float:
    """The absolute ridge ``lam · mean(diag H)`` (see the module docstring)."""
    return lam * max(float(torch.diagonal(H).mean()), 1e-12)


def aqer_correction(weight: torch.Tensor, H: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """Aqer's ``δW`` ``[out, in]`` = ``((H + λI)⁻¹ (C - H) Wᵀ)ᵀ`` for an absolute ``λ > 0``.

    ``H = 2 X̃ᵀX̃ / N`` and ``C = 2 X̃ᵀX / N`` (``[in, in]``): the quantized inputs' Gram matrix and their cross term
    with the float inputs of the same tokens.
    """
    if lam <= 0:
        raise ValueError(f"Aqer: ridge λ={lam} must be positive. Fix: erq_lambda > 0 (e.g. 0.01)")
    W = weight.to(H.dtype)
    return ridge_solve(H, (C - H) @ W.T, lam).T


def aqer(weight: torch.Tensor, H: torch.Tensor, C: torch.Tensor, lam: float = 0.01) -> torch.Tensor:
    """The Aqer-corrected weight ``W + δW`` (float32), ``lam`` relative to ``mean(diag H)``."""
    H = H.float()
    W = weight.float().to(H.device)
    return W + aqer_correction(W, H, C.float().to(H.device), relative_ridge(H, lam))


def input_statistics(x_float: torch.Tensor, x_quant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = 2 X̃ᵀX̃ / N`` and ``C = 2 X̃ᵀX / N`` of paired inputs (rows: tokens; any leading shape)."""
    x = x_float.reshape(-1, x_float.shape[-1]).float()
    xq = x_quant.reshape(-1, x_quant.shape[-1]).float()
    n = x.shape[0]
    return 2 * xq.T @ xq / n, 2 * xq.T @ x / n
