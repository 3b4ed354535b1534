"""The platform layer: Ray Train/Tune, DeepSpeed and MLflow around the flora library."""
