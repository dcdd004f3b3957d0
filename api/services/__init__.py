"""Catalog service functions: keyword-only, typed, raising domain errors from ``ckptd.api.errors``.

Shared by the HTTP routes and the CLI; none of them knows about HTTP.
"""
