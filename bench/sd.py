"""Stable Diffusion 1.5-shaped pipeline with random weights at 512x512, fp16 on CUDA: images/s and peak memory.

    python -m bench.sd            writes bench/results/sd.json and sd.md (only where a CUDA GPU is present)

The weights are random (built from the SD 1.5 configs, nothing downloaded), so the images are
noise; the cost per image is that of the real model: same shapes, same number of UNet passes.
Without a CUDA GPU it says so and exits with status 0 without writing anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def sd15_pipeline(device: str):
    """StableDiffusionPipeline with SD 1.5's component shapes and random weights (fp16)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))  # fmt: skip
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe = pipe.to(device, torch.float16)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for m in (unet, vae, text) for p in m.parameters())
    return pipe, params


def main(argv: list[str] | None = None) -> int:
    """Entry for `python -m bench.sd`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/sd: no CUDA GPU on this machine, so nothing was measured and no result was written.\n"
              "It times fp16 Stable Diffusion at 512x512; run it where `torch.cuda.is_available()` is true.")  # fmt: skip
        return 0
    from hub.foundation.stable_diffusion import batch_size_for

    device = "cuda"
    pipe, params = sd15_pipeline(device)
    rows = []
    auto = batch_size_for(device, 512, 512, args.guidance)
    for batch in sorted(set(args.batches) | {auto}):
        emb = torch.randn(batch, 77, 768, device=device, dtype=torch.float16)
        neg = torch.zeros_like(emb)
        run = lambda emb=emb, neg=neg: pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=args.steps,  # noqa: E731
                                            guidance_scale=args.guidance, height=512, width=512, output_type="np")  # fmt: skip
        run()  # warm-up (cuDNN autotuning, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        best = min(times)
        rows.append({"batch": batch, "auto_batch": batch == auto, "steps": args.steps, "guidance": args.guidance,
                     "seconds_per_call": round(best, 3), "images_per_s": round(batch / best, 3),
                     "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
            "parameters": params, "dtype": "float16", "resolution": 512, "command": "python -m bench.sd " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sd.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Stable Diffusion 1.5-shaped, random weights, 512x512 fp16 on {meta['gpu']}", "",
             f"{args.steps} DDIM steps, guidance {args.guidance}; {params / 1e6:.0f} M parameters. `{meta['command']}`", "",
             "| batch | s per call | images/s | peak memory (GiB) |", "|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {r['batch']}{' (auto)' if r['auto_batch'] else ''} | {r['seconds_per_call']} | {r['images_per_s']} | {r['peak_memory_gib']} |"
        for r in rows
    ]
    (RESULTS / "sd.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
