"""ProVQ: progressive-quantization image tokenizers and autoregressive priors (arXiv 2603.22304)."""
