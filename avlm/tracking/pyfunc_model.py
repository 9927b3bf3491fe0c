"""Code of every avlm registered model, logged with MLflow's "models from code" (nothing is pickled).

MLflow runs this file when the model is loaded; it rebuilds the recipe's model from the checkpoint's
``config.yaml`` and ``trainable.safetensors``. Logging the torch module itself (``mlflow.pytorch``) would store
the frozen backbone and, in MLflow 3, go through torch.export.

What ``predict`` takes is the model's signature, logged by ``log_and_register`` from the recipe's input example:
a tensor (CVS clips, validated by shape and dtype) or named columns (caption: ``audio_path`` or ``frames_dir``).
The type hint of ``predict`` names that container (``np.ndarray`` or ``pd.DataFrame``), which is all a hint can
say about clips of a fixed shape; MLflow accepts no union there, hence one class per input kind, chosen by the
``input`` key of the model config.

A bad request must read as one: an avlm error from the recipe's predictor (a missing column, an unreadable file)
is raised as an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which ``mlflow models serve`` answers with
HTTP 400 and the avlm message, and so is a tensor with NaN or inf in it, which no schema catches; anything else is
the model's own failure and stays a server error.
"""

import importlib
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelConfig
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from avlm.errors import AvlmError


class CheckpointModel(PythonModel):
    """The recipe's predictor (``avlm.recipes.<recipe>.load_predictor``) on the logged checkpoint."""

    def load_context(self, context: Any) -> None:
        recipe = importlib.import_module(f"avlm.recipes.{context.model_config['recipe']}")
        self.predictor = recipe.load_predictor(context.artifacts["checkpoint"])

    def predict_checked(self, model_input: Any) -> Any:
        """The predictor's answer; its avlm errors become bad requests (HTTP 400 when served)."""
        try:
            return self.predictor(model_input)
        except AvlmError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e


class TensorInputModel(CheckpointModel):
    """For a tensor signature (CVS clips); refuses NaN and inf."""

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        # The signature checks shape and dtype, not values; a NaN pixel would come back as NaN probabilities.
        bad = int(np.size(model_input) - np.count_nonzero(np.isfinite(model_input)))
        if bad:
            raise MlflowException(
                f"model input has {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf)",
                error_code=INVALID_PARAMETER_VALUE,
            )
        return self.predict_checked(model_input)


class ColumnsInputModel(CheckpointModel):
    """For a column signature (caption: ``audio_path`` or ``frames_dir``)."""

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        return self.predict_checked(model_input)


MODEL_FOR_INPUT = {"tensor": TensorInputModel, "columns": ColumnsInputModel}

# Each logged model keeps its own copy of this file, so versions logged before the "input" key never run this line.
mlflow.models.set_model(MODEL_FOR_INPUT[ModelConfig().get("input")]())
