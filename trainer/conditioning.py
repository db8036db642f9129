"""SDXL text conditioning: penultimate hidden states of both CLIP encoders (concatenated), the pooled projection of
encoder 2, and the micro-conditioning time ids ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]``."""
from __future__ import annotations

import torch

from trainer.models.roles import Conditioning


def time_ids(resolution: int | tuple[int, int], crop: tuple[int, int] = (0, 0), original: tuple[int, int] | None = None) -> torch.Tensor:
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    oh, ow = original or (h, w)
    return torch.tensor([oh, ow, crop[0], crop[1], h, w], dtype=torch.float32)


@torch.no_grad()
def encode_prompts(model, prompts: list[str], resolution: int, *, batch_size: int = 32, device=None) -> Conditioning:
    """Encode prompts with an ``SDXLModel``'s two text encoders (on ``device``), returning CPU float32 tensors."""
    device = device or next(model.text_encoder.parameters()).device
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        hidden = []
        for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float().cpu())
        pooled.append(out.text_embeds.float().cpu())  # encoder 2 is CLIPTextModelWithProjection
        embeds.append(torch.cat(hidden, dim=-1))
    ids = time_ids(resolution).expand(len(prompts), 6).clone()
    return Conditioning(torch.cat(embeds), torch.cat(pooled), ids)
