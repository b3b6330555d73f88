"""PyptoServing: LLM serving replicas on Kubernetes with Huawei Ascend NPUs."""

__version__ = "0.1.0"
