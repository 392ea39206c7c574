"""kubelvs: Linux Virtual Server (IPVS) load balancing for Kubernetes."""

__version__ = "0.1.0"
