"""Weight-only quantization: int8 / int4 linears (GPTQ layout on disk) and the GPTQ algorithm."""
