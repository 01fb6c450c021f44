"""Pipeline stages: thin entry points, one module each, each exposing ``run(params) -> metrics``.

``dvc.yaml`` calls them through the ``rlhf`` command; they read only their own
sections of ``params.yaml`` plus ``paths``.
"""
