"""The worker's prompt-embedding cache: text-encoder outputs kept between jobs, LRU within a byte cap.

A text's embedding depends on the model, the text, how it is encoded (the family's text path and
its ``max_sequence_length``) and any adapter that changes the text encoder; the key holds all of
them. Each *text* is an entry, positive and negative prompts alike: the SD and Wan families encode
a negative prompt (or ``""`` for none) through exactly the path of a positive one, so one entry
serves both roles, and whether guidance is on only decides which texts a job needs.

Outputs are identical with and without the cache: the text encoders treat rows independently (each
text is padded to the same fixed length), so an embedding computed in one batch of texts equals
the one computed in another (tests/backends/test_prompt_cache.py compares the output bytes), and a
hit hands back exactly the tensor a miss stored. Entries are kept in host memory (a GPU worker's
device memory stays the residency manager's to count) and moved to the device on use.

A hit or miss is the worker's business, never part of the batch key (DESIGN §5): the worker
reports it per job in ``job_done``'s ``execution.prompt_cache``.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from .families.speed import PROMPT_CACHE_BYTES as DEFAULT_BYTES


def encoder_adapters(job: Mapping[str, Any]) -> str:
    """The job's adapters as part of the key: any adapter may change the text encoder, so a job with
    adapters never shares an entry with one without (or with others)."""
    adapters = job.get("adapters")
    return json.dumps(adapters, sort_keys=True, default=str) if adapters else ""


class PromptCache:
    """LRU of text embeddings within ``max_bytes`` (0: off: nothing is kept, every job misses)."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: tuple) -> Any | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: tuple, value: Any) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()


class TextPath:
    """How one family encodes a list of texts (each as a positive prompt, guidance off): one row each."""

    name = "?"

    def __init__(self, max_sequence_length: int | None = None) -> None:
        self.max_sequence_length = max_sequence_length

    def encode(self, pipe: Any, texts: list[str], device: Any) -> Any:
        raise NotImplementedError

    def cfg(self, pipe: Any, guidance: float) -> bool:
        """Whether the pipeline encodes negative prompts at this guidance (classifier-free guidance)."""
        return guidance > 1.0


class ClipText(TextPath):
    """StableDiffusionPipeline and its img2img / inpaint siblings (one CLIP text encoder)."""

    name = "clip"

    def cfg(self, pipe, guidance):
        return guidance > 1.0 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None  # LCM: none

    def encode(self, pipe, texts, device):
        return pipe.encode_prompt(texts, device, 1, False)[0]


class T5Text(TextPath):
    """WanPipeline / WanImageToVideoPipeline (UMT5, padded to ``max_sequence_length``)."""

    name = "umt5"

    def encode(self, pipe, texts, device):
        return pipe.encode_prompt(texts, None, False, 1, max_sequence_length=self.max_sequence_length or 512,
                                  device=device)[0]


class Embedder:
    """Embeddings of texts for one loaded model through ``path``, from ``cache`` where it has them.
    The misses of one request are encoded in one text-encoder call."""

    def __init__(self, model: str, path: TextPath, cache: PromptCache) -> None:
        self.model, self.path, self.cache = model, path, cache

    def key(self, text: str, adapters: str) -> tuple:
        return (self.model, self.path.name, self.path.max_sequence_length, text, adapters)

    def rows(self, pipe: Any, texts: Sequence[str], adapters: Sequence[str], device: Any) -> tuple[list[Any], list[bool]]:
        """One embedding row per text (``[1, ...]`` tensors on ``device``) and whether each was a hit."""
        keys = [self.key(t, a) for t, a in zip(texts, adapters)]
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            import torch

            with torch.inference_mode():
                embs = self.path.encode(pipe, [k[3] for k in missing], device)
            for i, k in enumerate(missing):
                found[k] = embs[i:i + 1].to("cpu", copy=True)  # its own storage: not a view of the batch
                self.cache.put(k, found[k])
        return [found[k].to(device) for k in keys], [k not in missing for k in keys]

    def job_rows(self, pipe: Any, jobs: Sequence[Mapping[str, Any]], cfg: bool, device: Any
                 ) -> tuple[Any, Any | None, list[str]]:
        """(prompt embeddings, negative embeddings when ``cfg``, else None, per job "hit" | "miss").
        With guidance a job without a negative prompt gets the embedding of ``""``, as the
        pipelines do; a job is a hit when every text it needed came from the cache."""
        import torch

        texts = [j["prompt"] for j in jobs]
        if cfg:
            texts += [j.get("negative_prompt") or "" for j in jobs]
        adapters = [encoder_adapters(j) for j in jobs] * (2 if cfg else 1)
        rows, hit = self.rows(pipe, texts, adapters, device)
        n = len(jobs)
        status = ["hit" if hit[i] and (not cfg or hit[n + i]) else "miss" for i in range(n)]
        cond = torch.cat(rows[:n])
        return cond, (torch.cat(rows[n:]) if cfg else None), status


def embedded_call(embedder: Embedder, pipe: Any, jobs: Sequence[Mapping[str, Any]], call: dict[str, Any],
                  cfg: bool, device: Any) -> list[str]:
    """Replace ``call``'s prompts by their (cached) embeddings; each job's "hit" | "miss"."""
    cond, uncond, status = embedder.job_rows(pipe, jobs, cfg, device)
    call.pop("prompt", None)
    call.pop("negative_prompt", None)
    call["prompt_embeds"] = cond
    if uncond is not None:
        call["negative_prompt_embeds"] = uncond
    return status


def make_embedder(model: str, adapter: Any, spec: Mapping[str, Any]) -> Embedder | None:
    """The loaded model's embedder, or None: the cache is off (``prompt_cache_bytes = 0``) or its
    family's pipeline encodes its prompts itself."""
    cap = spec.get("prompt_cache_bytes")
    cap = DEFAULT_BYTES if cap is None else int(cap)
    path = adapter.text_path()
    return Embedder(model, path, PromptCache(cap)) if cap > 0 and path is not None else None
