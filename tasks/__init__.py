"""Thin Prefect tasks: each runs one DVC stage and returns its metrics."""
