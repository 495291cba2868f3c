"""slmkit: build, train, evaluate and serve your own small language model."""

__version__ = "0.1.0"
