"""Connectors, parsing, chunking and embedding: from a source to vectors.

Nothing here knows about the index or the catalog; ``index.sync`` drives these
steps and applies their output.
"""
