"""Prefect orchestration of the DVC stages: the flow `dcgan-pipeline` (pipeline.py), its
view of the DVC workspace (workspace.py), the artifacts the UI shows (artifacts.py) and the
scheduled deployment `dcgan-pipeline/nightly` (serve.py). Nothing here may be imported by
`components/`."""
