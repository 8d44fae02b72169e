"""Writers of quantized layers in other ecosystems' checkpoint layouts (GPTQ, ...)."""
