"""HTTP routes of the catalog, one module per resource; all mounted under ``/api/v1``."""
