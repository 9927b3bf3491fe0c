"""avlm: frozen foundation encoders with small trainable parts, tracked end to end in MLflow."""

__version__ = "0.1.0"
