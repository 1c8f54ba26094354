"""gRPC contracts (vcflash.v1) and their generated Python modules (issue 3)."""
