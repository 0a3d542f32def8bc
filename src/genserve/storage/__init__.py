"""Where outputs live: result stores used by workers and the API alike (outside ``server/`` so
workers and backends never import the server)."""
from .results import (IMAGE_TYPES, OUTPUT_TYPES, THUMBNAIL_NAME, THUMBNAIL_TYPE, LocalResultStore, ObjectInfo,
                      ResultRef, ResultStore, output_name, output_type, stored_objects)

__all__ = ["IMAGE_TYPES", "OUTPUT_TYPES", "THUMBNAIL_NAME", "THUMBNAIL_TYPE", "LocalResultStore", "ObjectInfo",
           "ResultRef", "ResultStore", "output_name", "output_type", "stored_objects"]
