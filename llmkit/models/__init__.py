"""Model families assembled from llmkit.layers."""
