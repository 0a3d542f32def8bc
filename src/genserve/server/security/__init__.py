"""Security: API keys and principals (``keys.py``), authentication and per-tenant admission (``auth.py``, with the
token buckets of ``rate.py``), body and URL limits at the edge (``limits.py``) and outbound-URL checks against
SSRF (``ssrf.py``).

May import: config and the server's vocabulary (requests, status). It imports no route, record or runtime."""
