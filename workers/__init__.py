"""Data plane of compress-sweep: code that runs inside Ray trial processes.

Nothing in this package imports ``orchestrator``; heavy libraries (torch,
transformers) are imported inside functions so the registries stay cheap to
import on the driver, where specs are validated.
"""
