"""The built-in demo catalog: what ``genserve serve`` serves with no config. Each demo source is a
real diffusers pipeline with tiny seeded random weights, built on first start (backends/demo.py)."""

# source -> the kind of model it builds (backends/demo.py builds ``demo:<name>`` with BUILDERS[name])
DEMO_SOURCES = {"demo:image": "image", "demo:video": "video", "demo:i2v": "video"}

DEMO_TOML = """
[models.demo-image]
kind = "image"
source = "demo:image"
dtype = "float32"
max_batch_size = 8
max_wait_ms = 50
sizes = ["64x64", "128x128", "64x128", "128x64"]
size_multiple = 8
default_size = "64x64"
default_steps = 8
max_steps = 100
default_guidance = 1.0

[models.demo-video]
kind = "video"
source = "demo:video"
dtype = "float32"
max_batch_size = 4
max_wait_ms = 50
max_pixels = 16384
size_multiple = 16
default_size = "64x64"
default_steps = 8
max_steps = 100
default_guidance = 1.0
default_frames = 9
max_frames = 33
frame_stride = 4
fps = 8

[models.demo-i2v]
kind = "video"
source = "demo:i2v"
dtype = "float32"
max_batch_size = 4
max_wait_ms = 50
max_pixels = 16384
size_multiple = 16
default_size = "64x64"
default_steps = 8
max_steps = 100
default_guidance = 1.0
default_frames = 9
max_frames = 33
frame_stride = 4
fps = 8
"""
