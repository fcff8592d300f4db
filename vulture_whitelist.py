"""Names vulture cannot see used (`vulture` reads pyproject.toml's [tool.vulture]: the three
packages and this file). Each entry says who uses it; anything else vulture reports is dead.
Not imported by anything: vulture reads it as text."""
# ruff: noqa

# Called by a framework, not by our code
_.forward  # torch.nn.Module: the traced Core ML wrappers (convert/coreml.py)
_.short_description  # coremltools: the exported model's input and output descriptions
_.normalizer, _.pre_tokenizer, _.post_processor  # tokenizers: the tiny tokenizer's pipeline
_.thread_type, _.thread_count, _.skip_frame  # PyAV: codec context settings the decoder reads
_.writeable  # numpy: frames are handed out read-only (`flags.writeable = False`)
__getattr__  # PEP 562: sfllava_mlx and sfllava_mlx.frames import their heavy parts on use

# Fields serialised whole (dataclasses.asdict), never read by name
_.video_size, _.video_sampled  # cache.CacheKey: its digest is of every field
_.torn, _.unreadable  # batch.results.Lines: what a read dropped (tests check the counts)

# sfllava_convert.tiny serves tests/ and bench/, outside the packages vulture reads
_.client, _.http, _.alive  # tiny.command.Server
first_message, picture_array, write_tiny_whisper, sharpen  # tiny.command, pictures, whisper, checkpoint
have_ffmpeg, make_ffv1_video, make_ffmpeg_video, make_audio_only  # tiny.videos

# The library's all-at-once forms of its steps: tests and scripts call them
encode_frames, encode_video, encode_image  # encode, image (the runtime runs the *_steps forms)
_.caption  # rich.Table: eval's timings under its table
