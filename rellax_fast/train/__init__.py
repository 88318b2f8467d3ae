"""The ReLLaX model wrapper, training, read-out and metrics."""
