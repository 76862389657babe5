"""The inference server: SageMaker-compatible HTTP in front of any recsql model."""
