"""Vector index backends and the catalog of sources, documents, chunks and generations."""
