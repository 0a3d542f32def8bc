"""Where outputs live: result stores used by workers and the API alike (outside ``server/`` so
workers and backends never import the server)."""
from .results import OUTPUT_TYPES, LocalResultStore, ObjectInfo, ResultRef, ResultStore, output_name

__all__ = ["OUTPUT_TYPES", "LocalResultStore", "ObjectInfo", "ResultRef", "ResultStore", "output_name"]
