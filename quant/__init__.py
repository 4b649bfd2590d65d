"""4-bit quantization and quantized execution: block formats (formats.py), QuantLinear, recipes, GGUF out."""
