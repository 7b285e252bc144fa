"""Rendering for a Kubernetes cluster: the serving objects (`sovllm render k8s`)."""
