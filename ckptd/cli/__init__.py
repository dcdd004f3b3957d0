"""The ckptd command line."""
