"""Training programs for empf_jax: configs, input pipelines, the training driver, checkpoints."""
