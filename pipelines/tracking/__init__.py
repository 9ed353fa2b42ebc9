"""MLflow: the logger and fit callbacks, the registry and its promotion gate, the expert library, the pyfunc model."""
