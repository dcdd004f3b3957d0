"""Model facts a checkpoint records, and the target layouts the trainer would refuse for them.

The bundled trainer records its model's shape facts (layers, heads, widths, vocabulary) under
``MODEL_FACTS_KEY`` in the ``extra`` of its layouts; any writer may also put them in the
manifest's metadata under the same key. ``ckptd convert`` checks a target mesh against them
with the trainer's own rules, so it never produces a checkpoint in a layout no job can run (``tp``
not dividing the heads, more pipeline stages than layers). The rules belong to the trainer, a layer
above the converters: whoever calls (the CLI) hands them in as ``refuse`` (for the bundled trainer,
``ckptd.training.config.refuse_layout``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ckptd.format.errors import MetadataError
from ckptd.format.manifest import Manifest

MODEL_FACTS_KEY = "ckptd.model"
"""Where a checkpoint records its model's shape facts (the ``extra`` of the trainer's layouts, or
the manifest's metadata): what tools need to refuse a layout the trainer would refuse."""

LayoutRule = Callable[[Mapping[str, Any], Mapping[str, int]], "str | None"]
"""``(facts, mesh) -> why the mesh cannot run the model`` (None: it can); raises ``ValueError``
when the facts themselves are malformed."""


def recorded_facts(manifest: Manifest) -> Mapping[str, Any] | None:
    """The model facts of ``manifest``: its metadata's, else the first layout recording them."""
    facts = manifest.metadata.get(MODEL_FACTS_KEY)
    if facts is not None:
        return _mapping(facts)
    for a in manifest.arrays.values():
        if a.layout is not None and MODEL_FACTS_KEY in a.layout.extra:
            return _mapping(a.layout.extra[MODEL_FACTS_KEY])
    return None


def mesh_refusal(manifest: Manifest, mesh: Mapping[str, int], refuse: LayoutRule) -> str | None:
    """Why ``mesh`` does not fit the model ``manifest`` records, by the rule ``refuse`` (None: it
    fits, or nothing is recorded)."""
    facts = recorded_facts(manifest)
    if facts is None:
        return None
    try:
        why = refuse(facts, mesh)
    except ValueError as e:
        raise MetadataError(f"step {manifest.step}: the recorded model facts are malformed: {e}") from e
    if why is None:
        return None
    target = ",".join(f"{k}={v}" for k, v in mesh.items())
    return f"target mesh {target} does not fit the model step {manifest.step} records: {why}"


def _mapping(facts: Any) -> Mapping[str, Any]:
    if not isinstance(facts, Mapping):
        raise MetadataError(f"{MODEL_FACTS_KEY} must be a JSON object, got {type(facts).__name__}")
    return facts
