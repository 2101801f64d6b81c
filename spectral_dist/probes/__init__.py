"""spectral_dist.probes"""
