"""empf_jax: EM-PF spiking neural networks with binary weights, trained online, in JAX/Flax."""
