"""`fedge-hub export-encoders --model DIR --out DIR`: a checkpoint's CLIP encoders as ONNX, for the edges.

Writes `text_encoder.onnx` (input `input_ids` int64 [N, max_length] -> `last_hidden_state`
[N, max_length, dim], exactly what the pipeline computes for `prompt_embeds`), `tokenizer.json`
(the `tokenizers` format, so the edge tokenizes without transformers or torch), and, when the
checkpoint has an `image_encoder`, `image_encoder.onnx` (`pixel_values` -> `image_embeds`). The
manifest records hashes, dimensions, the padding the pipeline uses, and the hash of the source
weights, which the hub checks before serving contributions made with these encoders.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from hub.foundation.bundle import sha256_file


class _LastHidden(nn.Module):
    """CLIPTextModel -> its last_hidden_state only (what StableDiffusionPipeline uses as prompt_embeds)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


class _ImageEmbeds(nn.Module):
    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixel_values).image_embeds


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation chatter
        torch.onnx.export(
            module.eval(), (example,), str(path), input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, dynamo=False, opset_version=17,
        )  # fmt: skip


def _preprocessing(model_dir: Path, size: int) -> dict:
    """CLIP's image preprocessing, from the checkpoint's feature_extractor (or CLIP's defaults), for the edge."""
    cfg_path = model_dir / "feature_extractor" / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    resize, crop = cfg.get("size", size), cfg.get("crop_size", size)
    resize = resize.get("shortest_edge", size) if isinstance(resize, dict) else resize
    crop = crop.get("height", size) if isinstance(crop, dict) else crop
    return {
        "resize_shortest_edge": int(resize),
        "crop_size": int(crop),
        "image_mean": cfg.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
        "image_std": cfg.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
    }


def export_encoders(model_dir: Path, out_dir: Path) -> dict:
    """Export the encoders of the diffusers checkpoint in `model_dir` to `out_dir`; returns the manifest."""
    from transformers import AutoTokenizer, CLIPTextModel

    from hub.foundation.stable_diffusion import _weights_hash

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "text_encoder").is_dir() or not (model_dir / "tokenizer").is_dir():
        raise FileNotFoundError(
            f"{model_dir} has no text_encoder/ and tokenizer/ (a diffusers Stable Diffusion layout)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"), local_files_only=True)
    if not tok.is_fast:
        raise ValueError("the checkpoint's tokenizer has no fast (tokenizers) form; the edge needs tokenizer.json")
    te = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"), local_files_only=True).float().eval()
    max_length = int(tok.model_max_length)
    if max_length > te.config.max_position_embeddings:
        max_length = int(te.config.max_position_embeddings)
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    example = tok(
        ["a photo"], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    _export(_LastHidden(te), example, out_dir / "text_encoder.onnx", "input_ids", "last_hidden_state")
    text_sha = sha256_file(out_dir / "text_encoder.onnx")
    manifest: dict = {
        "source": str(model_dir),
        "source_sha256": _weights_hash(model_dir),
        "text": {
            "file": "text_encoder.onnx",
            "tokenizer": "tokenizer.json",
            "encoder_id": f"clip-text-{text_sha[:12]}",
            "max_length": max_length,
            "dim": int(te.config.hidden_size),
            "pad_token": tok.pad_token,
            "pad_token_id": int(tok.pad_token_id),
            "input": "input_ids",
            "output": "last_hidden_state",
        },
    }
    if (model_dir / "image_encoder").is_dir():
        from transformers import CLIPVisionModelWithProjection

        ie = (
            CLIPVisionModelWithProjection.from_pretrained(str(model_dir / "image_encoder"), local_files_only=True)
            .float()
            .eval()
        )
        size = int(ie.config.image_size)
        _export(
            _ImageEmbeds(ie),
            torch.rand(1, 3, size, size),
            out_dir / "image_encoder.onnx",
            "pixel_values",
            "image_embeds",
        )
        manifest["image"] = {
            "file": "image_encoder.onnx",
            "encoder_id": f"clip-image-{sha256_file(out_dir / 'image_encoder.onnx')[:12]}",
            "input": "pixel_values",
            "output": "image_embeds",
            "dim": int(ie.config.projection_dim),
            **_preprocessing(model_dir, size),
        }
    manifest["files"] = {p.name: sha256_file(p) for p in sorted(out_dir.iterdir()) if p.name != "manifest.json"}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Entry for `python -m hub.foundation.export_encoders` (the arguments are parsed in hub.cli, without torch)."""
    import sys

    from hub.cli import main as cli_main

    return cli_main(["export-encoders", *(sys.argv[1:] if argv is None else argv)])
