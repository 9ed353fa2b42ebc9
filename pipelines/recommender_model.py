"""MLflow "models from code" definition of the served recommender (logged as this file, never pickled).

MLflow copies this file into the logged model and runs it at load time; ``set_model`` names the model object. All
state comes from the model's artifacts (the bundle of :mod:`moa.pipelines.service`: safetensors weights, JSON
configs, the Parquet item table, the cached item representations).

Input: a DataFrame with ``history`` (list of item ids) and ``domain`` (str) per row; param ``k`` (default 10).
Output: ``items`` (top-k item ids) and ``scores`` per row. A bad request raises an ``MlflowException`` with
``INVALID_PARAMETER_VALUE``, which the scoring server answers with HTTP 400 and the message.
"""

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class MoARecommender(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from moa.pipelines.service import RecommendationService

        artifacts = context.artifacts
        self.service = RecommendationService.from_files(
            artifacts["recommenders"], artifacts["items"], artifacts["service"], artifacts.get("item_tables"),
            artifacts.get("manifest"))

    def predict(self, context, model_input, params=None):
        """A DataFrame in and out, checked against the logged signature (no type hints: those would make MLflow
        expect the ``inputs`` payload instead of ``dataframe_records`` / ``dataframe_split``)."""
        from moa.pipelines.service import RequestError

        k = (params or {}).get("k", 10)
        try:
            return self.service.predict_frame(model_input, k)
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(MoARecommender())
