"""spectral_dist.logging"""
