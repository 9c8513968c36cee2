"""Evaluation harness (VQA benchmarks, metrics, runners). Not built yet: see the eval issue."""
