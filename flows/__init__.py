"""Prefect flows: order the stage tasks and decide on their results.

Importing this package applies the project's offline runtime settings first,
because Prefect reads PREFECT_HOME and its server settings when it is imported.
"""

from rlhf_core import runtime

runtime.configure()
