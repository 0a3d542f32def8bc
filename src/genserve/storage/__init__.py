"""Where outputs live: result stores used by workers and the API alike (outside ``server/`` so
workers and backends never import the server)."""
from .results import OUTPUT_TYPES, LocalResultStore, ObjectInfo, ResultRef, ResultStore, output_name
from .results import THUMBNAIL_NAME, THUMBNAIL_TYPE, stored_objects

__all__ = ["OUTPUT_TYPES", "LocalResultStore", "ObjectInfo", "ResultRef", "ResultStore", "output_name",
           "THUMBNAIL_NAME", "THUMBNAIL_TYPE", "stored_objects"]
