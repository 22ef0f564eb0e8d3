"""Prefect orchestration of the DVC stages (the `dcgan-pipeline` flow lands with the
orchestration issue). Nothing here may be imported by `components/`."""
