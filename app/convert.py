"""`sfllava convert`: a Hugging Face SF-LLaVA-1.5 checkpoint -> an MLX model directory."""

from __future__ import annotations

import argparse

from .fmt import human_bytes, human_count


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-path", required=True, help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="output model directory")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weight dtype (default: the checkpoint's; float32 on MLX's CPU backend)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the LLM's weights")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4, help="bits per weight (with -q)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="quantization group size (with -q)")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read PyTorch pickles (*.bin, *.pth) with torch.load(weights_only=True)")
    p.add_argument("--coreml", action="store_true",
                   help="also export the vision tower to Core ML")


def print_summary(r) -> None:
    q = r.quantization
    quant = f"{q['bits']}-bit, group {q['group_size']} (LLM only)" if q else "none"
    print(f"converted {r.source} -> {r.output}")
    print(f"  layout        {r.layout}")
    print(f"  parameters    {human_count(r.parameters)}")
    print(f"  dtype         {r.dtype} (checkpoint: {r.source_dtype})")
    print(f"  quantization  {quant}")
    print(f"  vision tower  {r.feature_layer} of {r.vision_blocks} blocks (feature layer {r.feature_layer})")
    print(f"  size on disk  {human_bytes(r.bytes_on_disk)}")
    print(f"  time          {r.seconds:.1f} s")
    if r.dropped:
        from sfllava_convert.convert import group_dropped

        print(f"  dropped {len(r.dropped)} unused tensor(s):")
        for pattern, count, reason in group_dropped(r.dropped):
            print(f"    {pattern}" + (f" ({count} tensors)" if count > 1 else "") + f": {reason}")


def main(args) -> int:
    from sfllava_convert.convert import convert

    coreml = None
    if args.coreml:  # the exporter's needs checked first: no half-done work without them
        from sfllava_convert import coreml

        coreml.require()
    report = convert(
        args.hf_path, args.mlx_path, dtype=args.dtype, quantize=args.quantize,
        q_bits=args.q_bits, q_group_size=args.q_group_size, force=args.force,
        allow_pickle=args.allow_pickle,
    )
    print_summary(report)
    if coreml is not None:
        coreml.export(report.output)
    return 0
