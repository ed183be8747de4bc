"""vigo: configuration management whose control plane is never the fleet's single point of failure."""

__version__ = "0.1.0"
