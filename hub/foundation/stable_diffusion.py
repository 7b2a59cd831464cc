"""Stable Diffusion as the hub's foundation model, from weights on local disk, conditioned by site embeddings.

Sites send, per label, prototypes of CLIP text embeddings (the `last_hidden_state` the pipeline's
own text encoder would compute, flattened from [max_length, dim]); the hub hands each prototype to
`StableDiffusionPipeline` as `prompt_embeds`, so no prompt text ever leaves a site. The encoder the
sites run is the checkpoint's own text encoder, exported to ONNX by `fedge-hub export-encoders`
(hub/foundation/export_encoders.py), whose manifest gives the encoder id both sides check.

An unCLIP checkpoint (`StableUnCLIPImg2ImgPipeline`) is conditioned instead on CLIP image
embeddings: sites encode their images with the exported image encoder and send prototypes of
those, which the hub passes as `image_embeds`, unCLIP-style, like the bundled model.

Nothing is downloaded: `from_pretrained(..., local_files_only=True)` on a directory the user owns.
fp16 on CUDA; the batch size follows free GPU memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from contract.payloads import Contribution
from hub.synthesis import SynthesisConfig, Synthesizer, SyntheticSet, _seed, samples_for

log = logging.getLogger("fedge.hub")

# Measured order of magnitude for SD 1.5 at 512x512 in fp16 with classifier-free guidance
# (two UNet passes per step): activations per image, beyond the weights. Scaled by pixel count.
BYTES_PER_512_IMAGE = 600 * 2**20


def batch_size_for(device: str, height: int, width: int, guidance: float, cap: int = 64, cpu_default: int = 4) -> int:
    """Images per pipeline call: from free CUDA memory (80 % of it), or a small fixed batch on the CPU."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return cpu_default
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    per_image = BYTES_PER_512_IMAGE * (height * width) / (512 * 512) * (2 if guidance > 1 else 1)
    return int(max(1, min(cap, (0.8 * free) // per_image)))


@dataclass
class SDFoundation:
    """A Stable Diffusion checkpoint plus the manifest of its exported encoders."""

    pipeline: Any  # diffusers.StableDiffusionPipeline
    encoders: dict[str, Any]  # export manifest (hub/foundation/export_encoders.py)
    device: str
    image_size: int  # side of the global classifier's input; generated images are resized to it
    conditioning: str = "text"  # "text": prompt_embeds; "image": unCLIP image_embeds

    @property
    def encoder_id(self) -> str:
        """Id of the exported encoder whose embeddings the sites must send."""
        return str(self.encoders[self.conditioning]["encoder_id"])

    @property
    def dim(self) -> int:
        """Length of one embedding: max_length x hidden size (text, flattened) or the projection size (image)."""
        if self.conditioning == "image":
            return int(self.encoders["image"]["dim"])
        t = self.encoders["text"]
        return int(t["max_length"] * t["dim"])

    @property
    def manifest(self) -> dict[str, Any]:
        """What the registry records about the foundation model."""
        return {"backend": "stable-diffusion", "encoders": self.encoders}


def load(model_dir: Path, encoders_dir: Path, device: str = "cpu", image_size: int = 32) -> SDFoundation:
    """Load a local Stable Diffusion directory (diffusers layout) and the manifest of its exported encoders."""
    from diffusers import StableDiffusionPipeline, StableUnCLIPImg2ImgPipeline
    from diffusers.utils import logging as diffusers_logging

    model_dir, encoders_dir = Path(model_dir), Path(encoders_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline directory: model_index.json is missing")
    manifest_path = encoders_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{encoders_dir} has no manifest.json; run `fedge-hub export-encoders` first")
    encoders = json.loads(manifest_path.read_text())
    if encoders.get("source_sha256") != _weights_hash(model_dir):
        raise ValueError(f"the encoders in {encoders_dir} were exported from other weights than {model_dir}")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    diffusers_logging.disable_progress_bar()
    kind = json.loads((model_dir / "model_index.json").read_text()).get("_class_name", "")
    if kind == "StableUnCLIPImg2ImgPipeline":  # conditioned on CLIP image embeddings
        if "image" not in encoders:
            raise ValueError(f"{model_dir} is an unCLIP checkpoint but {encoders_dir} holds no exported image encoder")
        pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(
            str(model_dir), dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
        ).to(device)
        conditioning = "image"
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model_dir), dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False,
            low_cpu_mem_usage=False,
        ).to(device)  # fmt: skip
        conditioning = "text"
    pipe.set_progress_bar_config(disable=True)
    return SDFoundation(pipe, encoders, device, image_size, conditioning)


def _weights_hash(model_dir: Path) -> str:
    """sha256 over the text encoder's weight files: ties exported encoders to the checkpoint."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(
        p for p in (Path(model_dir) / "text_encoder").iterdir() if p.suffix in {".safetensors", ".bin", ".json"}
    )
    for p in files:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class SDSynthesizer(Synthesizer):
    """Synthesis with Stable Diffusion: each prototype is a `prompt_embeds`; seeds derive from the contribution."""

    foundation: SDFoundation  # type: ignore[assignment]

    def __init__(
        self, foundation: SDFoundation, config: SynthesisConfig, cache_dir: Path | None = None, progress: bool = True
    ):
        super().__init__(foundation, config, cache_dir, progress)  # type: ignore[arg-type]
        self._empty_prompt: torch.Tensor | None = None

    def _negative(self, n: int) -> torch.Tensor:
        """Embeddings of the empty prompt (the unconditional branch of classifier-free guidance), computed once."""
        if self._empty_prompt is None:
            pipe = self.foundation.pipeline
            ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids  # fmt: skip
            with torch.no_grad():
                self._empty_prompt = pipe.text_encoder(ids.to(pipe.device))[0]
        return self._empty_prompt.expand(n, -1, -1)

    def _run(self, contribution: Contribution, checkpoint: Callable[[], None] | None = None) -> SyntheticSet:
        cfg, fm = self.config, self.foundation
        pipe, t = fm.pipeline, fm.encoders["text"]
        image = fm.conditioning == "image"
        shape = (1, fm.dim) if image else (int(t["max_length"]), int(t["dim"]))
        side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        batch = batch_size_for(fm.device, side, side, cfg.guidance)
        jobs = []  # (label, prompt_embeds [1, L, D], n, seed)
        for lp in contribution.labels:
            vectors = lp.vectors.to_numpy()
            for j, count in enumerate(lp.counts):
                emb = torch.from_numpy(vectors[j].reshape(shape))[None]  # [1, L, D] (text) or [1, 1, D] (image)
                jobs.append(
                    (lp.label, emb, samples_for(count, cfg), _seed(cfg.seed, contribution.contribution_id, lp.label, j))
                )
        images, labels = [], []
        total = sum(n for _, _, n, _ in jobs)
        bar = tqdm(
            total=total, desc=f"synthesize {contribution.contribution_id[:8]}", disable=not self.progress, leave=False
        )
        for label, emb, n, seed in jobs:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            for start in range(0, n, batch):
                if checkpoint is not None:
                    checkpoint()
                m = min(batch, n - start)
                dtype = pipe.unet.dtype
                if image:  # unCLIP: the prototype is the image embedding; the prompt is empty
                    cond = {"prompt": [""] * m, "image_embeds": emb[:, 0].expand(m, -1).to(fm.device, dtype)}
                else:
                    neg = self._negative(m).to(fm.device, dtype) if cfg.guidance > 1 else None
                    cond = {"prompt_embeds": emb.expand(m, -1, -1).to(fm.device, dtype), "negative_prompt_embeds": neg}
                out = pipe(
                    **cond, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, generator=gen,
                    height=side, width=side, output_type="np",
                ).images  # [m, H, W, 3] in [0, 1]  # fmt: skip
                images.append(to_classifier_input(out, fm.image_size))
                labels += [label] * m
                bar.update(m)
                # Minutes per contribution on a GPU: the service log says how far it is (tqdm is off there).
                log.info(
                    "synthesize %s: %d/%d images (batch %d)",
                    contribution.contribution_id[:8],
                    len(labels),
                    total,
                    batch,
                )
        bar.close()
        if not images:
            return SyntheticSet(
                np.zeros((0, 1, fm.image_size, fm.image_size), np.float32), np.array([], str), np.array([], str)
            )
        return SyntheticSet(
            np.concatenate(images), np.array(labels), np.array([contribution.contribution_id] * len(labels))
        )


def to_classifier_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W, 3] in [0, 1] -> grayscale [N, 1, size, size] float32 (area resampling), as sites read images."""
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(0, 3, 1, 2)
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if gray.shape[-1] != size:
        gray = torch.nn.functional.interpolate(
            gray, size=(size, size), mode="area" if gray.shape[-1] > size else "bilinear"
        )
    return gray.clamp(0, 1).numpy()
