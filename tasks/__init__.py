"""Thin Prefect tasks: each runs one DVC stage and returns its metrics.

Importing this package applies the project's offline runtime settings first,
because Prefect reads PREFECT_HOME and its server settings when it is imported.
"""

from rlhf_core import runtime

runtime.configure()
