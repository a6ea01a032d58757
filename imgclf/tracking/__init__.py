"""MLflow, and only here: the store, the training run, the logged model, the registry."""
