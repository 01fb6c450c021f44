"""Prefect flows: order the stage tasks and decide on their results."""
