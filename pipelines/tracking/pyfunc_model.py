"""MLflow "models from code" definition of every served moa model (logged as this file, never pickled).

MLflow copies this file into the logged model and runs it at load time; ``set_model`` names the model object. All
state comes from the one artifact ``bundle``: the model's serving bundle (:mod:`moa.pipelines.bundle`), whose
``service.json`` names its kind (recommender, classifier, causal LM) and so the service that answers.

A bad request raises an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which the scoring server answers
with HTTP 400 and the message. Columns the model does not read are ignored and named in one WARNING line (MLflow
drops and names those its signature lacks; this model the ``task`` / ``domain`` of a model trained without them:
:func:`moa.pipelines.bundle.unread_columns`).
"""

import logging

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class MoAPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from moa.pipelines.bundle import load_service

        self.service = load_service(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        """A DataFrame in and out, checked against the logged signature (no type hints: those would make MLflow
        expect the ``inputs`` payload instead of ``dataframe_records`` / ``dataframe_split``)."""
        from moa.pipelines.bundle import RequestError, ignored_note, unread_columns

        ignored = unread_columns(getattr(model_input, "columns", ()), names=getattr(self.service, "meta", None))
        if ignored:
            logging.getLogger("moa.pyfunc").warning(ignored_note(ignored))
            model_input = model_input.drop(columns=ignored)
        try:
            return self.service.predict(model_input, {k: v for k, v in (params or {}).items() if v is not None})
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(MoAPyfunc())
