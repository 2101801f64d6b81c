"""spectral_dist.integrations"""
