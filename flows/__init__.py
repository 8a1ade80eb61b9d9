"""Prefect flows that orchestrate ingestion, reindexing and evaluation."""
