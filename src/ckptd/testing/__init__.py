"""Test suites that ship with ckptd, for code outside this repository.

``ckptd.testing.store_conformance.StoreTests`` is the conformance suite of the
``ckptd.format.store.Store`` contract: a third-party backend subclasses it and provides a
``store`` fixture. It needs pytest (``pip install 'ckptd[testing]'``); importing
``ckptd.testing`` alone does not.
"""

from __future__ import annotations

__all__ = ["StoreTests"]


def __getattr__(name: str) -> object:
    # Lazy (PEP 562): `import ckptd.testing` must not require pytest until the suite is used.
    if name == "StoreTests":
        from ckptd.testing.store_conformance import StoreTests

        return StoreTests
    raise AttributeError(f"module 'ckptd.testing' has no attribute {name!r}")
