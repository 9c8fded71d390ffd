"""Training programs for empf_jax: configs, input pipelines, the training driver, checkpoints.

Each program calls :func:`empf_jax.xla_defaults.apply_cpu_defaults` before JAX starts its backend,
so that the library's XLA CPU options are in place.
"""
