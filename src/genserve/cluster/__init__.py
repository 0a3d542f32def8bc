"""Running genserve on a cluster: the ``[cluster]`` and ``[results]`` config sections. The Ray
worker pool lives in ``workers/ray_pool.py``, the S3 result store in ``storage/s3.py``."""
