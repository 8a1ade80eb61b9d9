"""Choosing the generation a write goes to, and checking a generation's integrity.

A generation is a complete build of a collection under one pipeline
fingerprint. ``ragline ingest`` writes to the live generation only, and
refuses when the configured pipeline no longer matches it; ``ragline index
build`` fills a new generation beside the live one, which ``promote`` makes
live in one step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ingestion.errors import FingerprintMismatch

from .catalog import Catalog, Generation
from .vectors.base import VectorIndex

__all__ = ["generation_for_build", "generation_for_ingest", "verify_generation"]


PipelineRecord = Callable[[], Mapping[str, Any]]


def generation_for_ingest(
    catalog: Catalog,
    collection: str,
    backend: str,
    pipeline: PipelineRecord,
    fingerprint: str,
) -> Generation:
    """The live generation of a collection, created on the first ingest.

    ``pipeline`` returns the settings to record with a new generation; it is
    only called when one is created (it may need to load the model). Raises
    ``FingerprintMismatch`` when the live generation was built with another
    embedding model, chunking or parser.
    """
    live = catalog.live_generation(collection)
    if live is None:
        generation = _resume_or_create(
            catalog, collection, backend, pipeline, fingerprint
        )
        catalog.set_generation_state(generation.id, "ready")
        catalog.promote(collection, generation.id)
        return catalog.generation(generation.id)
    if live.fingerprint != fingerprint or live.backend != backend:
        raise FingerprintMismatch(
            f"Collection {collection!r} is served by generation {live.id}, built with "
            f"{_describe_difference(live, pipeline(), backend)}. Chunks made with the "
            "new settings cannot be mixed into it. Build a new generation with "
            f"`ragline index build --collection {collection}`, then make it live with "
            f"`ragline index promote --collection {collection}`."
        )
    return live


def generation_for_build(
    catalog: Catalog,
    collection: str,
    backend: str,
    pipeline: PipelineRecord,
    fingerprint: str,
) -> Generation:
    """A generation to build: an unfinished one with the same fingerprint, or a new one."""
    return _resume_or_create(catalog, collection, backend, pipeline, fingerprint)


def verify_generation(
    catalog: Catalog, index: VectorIndex, generation: Generation
) -> list[str]:
    """Every way the catalog and the index disagree; empty when they match."""
    problems = catalog.integrity_problems(generation.id)
    live = catalog.all_vector_ids(generation.id, state="live")
    everything = catalog.all_vector_ids(generation.id, state=None)
    held = index.ids()
    missing = np.setdiff1d(live, held)
    extra = np.setdiff1d(held, everything)
    if missing.size:
        problems.append(
            f"{missing.size} live chunks have no vector in the index "
            f"(e.g. vector id {int(missing[0])}); run `ragline ingest --full` to rewrite them"
        )
    if extra.size:
        problems.append(
            f"the index holds {extra.size} vectors the catalog does not know "
            f"(e.g. vector id {int(extra[0])}); the next `ragline ingest` removes them"
        )
    if len(np.unique(held)) != len(held):
        problems.append("the index holds the same vector id more than once")
    return problems


def _resume_or_create(
    catalog: Catalog,
    collection: str,
    backend: str,
    pipeline: PipelineRecord,
    fingerprint: str,
) -> Generation:
    for generation in reversed(catalog.generations(collection)):
        if (
            generation.state == "building"
            and generation.fingerprint == fingerprint
            and generation.backend == backend
        ):
            return generation
    return catalog.create_generation(collection, fingerprint, pipeline(), backend)


def _describe_difference(
    live: Generation, pipeline: Mapping[str, Any], backend: str
) -> str:
    changed = [
        f"{key} {live.pipeline.get(key)!r} (now {value!r})"
        for key, value in pipeline.items()
        if key != "dim" and live.pipeline.get(key) != value
    ]
    if live.backend != backend:
        changed.append(f"index backend {live.backend!r} (now {backend!r})")
    return "; ".join(changed) or "different settings"
