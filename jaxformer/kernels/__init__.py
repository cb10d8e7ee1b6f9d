"""Pallas kernels (`flash_attention`) and the pure-JAX references they are tested against."""
