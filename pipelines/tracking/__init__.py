"""MLflow: the store (:mod:`.store`), the logger (:mod:`.logger`), the fit callbacks (:mod:`.config`,
:mod:`.routing_stats`, :mod:`.resume`, :mod:`.log_bundle`), the registry and its promotion gate (:mod:`.registry`),
the expert library (:mod:`.expert_library`) and the pyfunc model (:mod:`.pyfunc_model`)."""
