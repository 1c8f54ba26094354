"""The platform every vcflash service stands on: settings, gRPC plumbing, the service lifecycle and the neutral
errors that domain errors subclass. Nothing here imports a domain package (hico, ingest, memory, ...)."""
