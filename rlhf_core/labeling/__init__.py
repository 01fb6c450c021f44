"""The human labelling app: a SQLite store, a small web app and the ``rlhf label`` commands."""
