"""The AWS control plane: SageMaker endpoints, batch transform, ECR, Pipelines, the Lambda.

Runs on an operator's machine (or in a Lambda), never in the serving container: it
may import every other recsql package, and none of them imports it.
"""
