"""The edge's encoders for Stable Diffusion hubs: the checkpoint's CLIP encoders exported to ONNX.

- `OnnxTextEncoder`: `tokenizers` + the text encoder turn prompts (a class-name template, or
  per-sample captions from metadata.csv) into the flattened `prompt_embeds` [max_length * dim] of
  the hub's text-conditioned pipeline.
- `OnnxClipImageEncoder`: CLIP's preprocessing in numpy/Pillow + the image encoder turn local
  images into `image_embeds` [dim] for an unCLIP (image-embedding conditioned) pipeline.

No torch, no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from edge.encoder import providers


class OnnxTextEncoder:
    """Prompts -> flattened CLIP last_hidden_state, tokenized and padded exactly as the pipeline does."""

    variant = "clip-text"

    def __init__(self, encoders_dir: Path, prefer_cuda: bool = True):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("the text path needs the tokenizers package: pip install 'fedge[edge,edge-sd]'") from None
        self.dir = Path(encoders_dir)
        manifest = json.loads((self.dir / "manifest.json").read_text())
        self.spec = t = manifest["text"]
        self.encoder_id = str(t["encoder_id"])
        self.max_length, self.dim = int(t["max_length"]), int(t["dim"])
        self.tokenizer = Tokenizer.from_file(str(self.dir / t["tokenizer"]))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(
            length=self.max_length, pad_id=int(t["pad_token_id"]), pad_token=str(t["pad_token"])
        )
        self.session = ort.InferenceSession(str(self.dir / t["file"]), providers=providers(prefer_cuda))

    @property
    def provider(self) -> str:
        """The execution provider actually in use."""
        return str(self.session.get_providers()[0])

    def token_ids(self, prompts: list[str]) -> np.ndarray:
        """int64 [N, max_length]."""
        return np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)

    def encode(self, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 [N, max_length * dim]; identical prompts are encoded once."""
        unique = sorted(set(prompts))
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(unique), batch_size):
            chunk = unique[i : i + batch_size]
            hidden = self.session.run(None, {self.spec["input"]: self.token_ids(chunk)})[0]
            out.update(zip(chunk, hidden.reshape(len(chunk), -1).astype(np.float32), strict=True))
        if not prompts:
            return np.zeros((0, self.max_length * self.dim), np.float32)
        return np.stack([out[p] for p in prompts])


def prompt_for(label: str, caption: str | None, template: str) -> str:
    """The sample's caption when it has one, else the class-name prompt."""
    return caption if caption else template.format(label=label)


class OnnxClipImageEncoder:
    """Images [N, 1, H, W] in [0, 1] (the local layout's grayscale) -> CLIP image_embeds [N, dim]."""

    variant = "clip-image"

    def __init__(self, encoders_dir: Path, prefer_cuda: bool = True):
        self.dir = Path(encoders_dir)
        manifest = json.loads((self.dir / "manifest.json").read_text())
        if "image" not in manifest:
            raise ValueError(f"{self.dir} holds no image encoder: the checkpoint it was exported from has none")
        self.spec = m = manifest["image"]
        self.encoder_id, self.dim = str(m["encoder_id"]), int(m["dim"])
        self.resize, self.crop = int(m["resize_shortest_edge"]), int(m["crop_size"])
        self.mean = np.array(m["image_mean"], np.float32)[:, None, None]
        self.std = np.array(m["image_std"], np.float32)[:, None, None]
        self.session = ort.InferenceSession(str(self.dir / m["file"]), providers=providers(prefer_cuda))

    @property
    def provider(self) -> str:
        """The execution provider actually in use."""
        return str(self.session.get_providers()[0])

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """One [H, W] image in [0, 1] -> [3, crop, crop] as CLIPImageProcessor does (bicubic, center crop, normalise)."""
        img = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), "L").convert("RGB")
        w, h = img.size
        scale = self.resize / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (img.size[0] - self.crop) // 2, (img.size[1] - self.crop) // 2
        img = img.crop((left, top, left + self.crop, top + self.crop))
        x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def encode(self, images: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """image_embeds [N, dim] of grayscale images [H, W] in [0, 1] (any sizes: each is resized and cropped)."""
        out = []
        for i in range(0, len(images), batch_size):
            x = np.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.append(self.session.run(None, {self.spec["input"]: x})[0])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)
