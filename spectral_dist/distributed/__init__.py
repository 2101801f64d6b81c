"""spectral_dist.distributed"""
