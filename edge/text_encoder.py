"""The edge's text encoder for Stable Diffusion hubs: `tokenizers` + the exported CLIP text encoder in onnxruntime.

Turns prompts (a class-name template, or per-sample captions from metadata.csv) into the flattened
`prompt_embeds` [max_length * dim] the hub's pipeline expects. No torch, no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge.encoder import providers


class OnnxTextEncoder:
    """Prompts -> flattened CLIP last_hidden_state, tokenized and padded exactly as the pipeline does."""

    def __init__(self, encoders_dir: Path, prefer_cuda: bool = True):
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
