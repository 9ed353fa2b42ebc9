"""Pipelines: the ``moa`` command (Lightning CLI, :mod:`.cli`), MLflow tracking (:mod:`.tracking`), the registry
(:mod:`.registry`), the recommendation service and its REST / batch serving (:mod:`.service`, :mod:`.serving`),
the main job (``python -m moa.pipelines.examples.main_job``) and the foundation tour (``python -m moa.pipelines.examples.tour``)."""
