"""Continuous evaluation: scoring answers, regression detection and reports."""
