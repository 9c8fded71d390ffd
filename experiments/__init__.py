"""Training programs for empf_jax: configs, input pipelines, the training driver, checkpoints.

The programs import :mod:`empf_jax` before JAX starts its backend, so that the library's XLA CPU
options (:mod:`empf_jax.xla_defaults`) are in place.
"""
