"""qbreak: which inputs does low-bit weight-only quantization break, and why?"""

__version__ = "0.1.0"
