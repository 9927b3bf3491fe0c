"""Code of every avlm registered model, logged with MLflow's "models from code" (nothing is pickled).

MLflow runs this file when the model is loaded; it rebuilds the recipe's model from the checkpoint's
``config.yaml`` and ``trainable.safetensors``. Logging the torch module itself (``mlflow.pytorch``) would store
the frozen backbone and, in MLflow 3, go through torch.export.
"""

import importlib

import mlflow
from mlflow.pyfunc import PythonModel


class AvlmCheckpointModel(PythonModel):
    def load_context(self, context):
        recipe = importlib.import_module(f"avlm.recipes.{context.model_config['recipe']}")
        self.predictor = recipe.load_predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        return self.predictor(model_input)


mlflow.models.set_model(AvlmCheckpointModel())
