"""Pipelines: the demo (``python -m moa.pipelines.demo``), and later the CLI, MLflow tracking and serving."""
