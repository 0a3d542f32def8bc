"""The server <-> worker message protocol. Messages are plain dicts sent over a multiprocessing Pipe.

server -> worker (``op``):
  load     {model, spec: {path, kind, dtype}, reason}
  unload   {model}                        (GPU: kept in the host-RAM tier when it fits)
  run      {batch_id, model, kind, params: {width, height, num_frames, steps, guidance, fps},
            jobs: [{id, prompt, negative_prompt, seed}]}
  cancel   {batch_id, job_ids}            (honoured at the next step boundary)
  shutdown {}
  hello    {}                             (a restarted server re-attached: unload all, say ready again)
worker -> server (``ev``):
  ready        {worker, device, device_name, pid, threads, capacity_bytes}
  heartbeat    {t}                    (every heartbeat_s, from its own thread)
  loaded       {model, cached, load_start, load_end, bytes, tier: disk | page_cache | host | resident}
  unloaded     {model, freed_bytes, kept_in, used_bytes, resident}
  load_failed  {model, code, message}
  started      {batch_id, t}
  progress     {batch_id, step, total}
  job_canceled {batch_id, job_id, t}
  job_done     {batch_id, job_id, result: {key, content_type, bytes}, inference_start, inference_end,
                output_written}
  batch_done   {batch_id, t, peak_bytes}
  batch_failed {batch_id, code, message}

Room to grow (DESIGN §7): a later ``join`` op can add jobs to a running batch at a step boundary;
nothing here assumes a batch is fixed beyond what ``run`` says.
"""
from __future__ import annotations

LOAD, UNLOAD, RUN, CANCEL, SHUTDOWN, HELLO = "load", "unload", "run", "cancel", "shutdown", "hello"
