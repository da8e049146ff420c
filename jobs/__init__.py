"""Cluster jobs: ``train_all`` (every category on Ray Train)."""
