"""Pipelines, in the order a request flows down (each folder imports only those below it; tests/test_layout.py):

* :mod:`.cli` - the ``moa`` command and the Lightning CLI behind ``fit`` / ``validate`` / ``test`` / ``predict``;
* :mod:`.serving` - the REST server, ``moa serve`` and ``moa batch``, Ray scale-out;
* :mod:`.tracking` - MLflow: logger and fit callbacks, registry and promotion gate, expert library, pyfunc model;
* :mod:`.kinds` - one subpackage per model kind (classifier, causal LM, recommender): module, bundle, service;
* :mod:`.bundle` - the kinds' interface: the kind registry (``register_kind``), bundles, request errors;
* :mod:`.data` - data modules and the pre-processing a row gets in training and in serving alike.

:mod:`.examples` holds the main job (``python -m moa.pipelines.examples.main_job``), the foundation tour
(``python -m moa.pipelines.examples.tour``) and their example data.
"""
