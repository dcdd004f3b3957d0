"""ckptd."""
