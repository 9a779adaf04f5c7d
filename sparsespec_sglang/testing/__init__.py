"""Test and study tools: the PyTorch reference oracle, model-dir fixtures, the real-model builder.

The runtime plugin never imports this package.
"""
