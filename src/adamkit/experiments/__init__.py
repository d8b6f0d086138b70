"""Small, self-contained optimizer experiments: analytic test objectives and the ``adamkit demo``."""
