"""The OpenAI-compatible routes: images (generations), edits and videos, and the shared wait for a job to finish
that turns a genserve job into an OpenAI response. Built over the same ``Api`` as the native routes."""
