"""spectral_dist.diagnostics"""
