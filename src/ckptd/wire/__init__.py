"""``ckptd.wire``: what the catalog and its clients agree on over HTTP, importable from anywhere.

A leaf package: it imports only the standard library (and httpx, lazily, inside the client), so
the engine, the api and the CLI all depend on it and it depends on none of them.
"""
