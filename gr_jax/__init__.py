"""gr_jax: Gradient Reweighting for imbalanced class-incremental learning in JAX."""
