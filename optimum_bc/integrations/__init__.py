"""Integrations: the transformers quantizer (``quant_method="bc"``), saving and pushing with a model card and
provenance, dequantization back to dense layers, PEFT adapters and lm-eval.

Floor above the engine (``api``) and ``export``: the only callers above it are the CLI and the package root.
"""
