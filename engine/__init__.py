"""hotserve: a config-driven OpenVINO model server over gRPC."""

__version__ = "0.1.0"
