"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel): how the engine calls the transformer, and the recorder of its
joint attention's text part for the attention maps.

The transformer works on the VAE's latent (N, C, h, w) directly (it cuts its own p x p patches and puts them back),
so the sampler, DF-RISE's masks and DF-CAM's maps all live on the latent grid as for a UNet. Its blocks
(JointTransformerBlock) return (text tokens, image tokens): DF-CAM takes the image tokens (hooks.image_stream) and
folds them back to the (h/p, w/p) patch grid (cam.as_grid).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from difflens.engine.runner import Added

T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default: T5's part of the embeddings


def sd3_call(transformer: Any, latents: torch.Tensor, timestep: int | float | torch.Tensor, embeds: torch.Tensor,
             added: Added | None) -> torch.Tensor:
    """SD3Transformer2DModel's velocity prediction. latents: (N, C, h, w); timestep: sigma x T, a scalar or (N,);
    embeds: (N, 77 + L3, D) CLIP then T5 tokens; added: {"pooled_projections": (N, P)} -> (N, C, h, w)."""
    if added is None or "pooled_projections" not in added:
        raise ValueError("an SD3 transformer call needs added['pooled_projections'] (N, P)")
    t = torch.as_tensor(timestep, device=latents.device)
    if t.dim() == 0:  # the pipeline passes t.expand(batch)
        t = t.expand(latents.shape[0])
    return transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
                       pooled_projections=added["pooled_projections"], return_dict=False)[0]


class JointAttentionTextRecorder:
    """SD3's attention processor for one joint attention (a block's `attn`, which sees image and text tokens),
    wrapping the block's own (JointAttnProcessor2_0), that records the attention of the image tokens' queries to
    the text tokens' keys.

    The block's output is the wrapped processor's, unchanged. The probabilities are computed again beside it as
    JointAttnProcessor2_0 computes attention: q, k projections of the image tokens and the text's added k
    projection, their optional RMS norms (SD3.5's qk_norm), keys [image; text], softmax(q k^T / sqrt(d)) over all
    of them; only the image-query x text-key block is kept, averaged over heads. `sink[name]` gets one (B, 1, N, S)
    tensor per call (N image tokens, S text tokens), detached, float32. The heads run one at a time: one head's
    N x (N + S) logits at a time, not all heads' at once.
    """

    def __init__(self, name: str, sink: dict[str, list[torch.Tensor]], processor: Any) -> None:
        self.name = name
        self.sink = sink
        self.processor = processor

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """hidden_states: (B, N, C) image tokens; encoder_hidden_states: (B, S, C) text tokens. -> the wrapped
        processor's output."""
        out = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is not None:
            with torch.no_grad():
                self.sink.setdefault(self.name, []).append(text_probs(attn, hidden_states, encoder_hidden_states))
        return out


def text_probs(attn: Any, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """image: (B, N, C), text: (B, S, C) -> the image queries' attention probabilities on the text keys, averaged
    over heads, (B, 1, N, S) float32 (JointTransformerBlock's joint attention: softmax over [image; text] keys)."""
    b = image.shape[0]

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
        return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    q, k, k_text = heads(attn.to_q(image)), heads(attn.to_k(image)), heads(attn.add_k_proj(text))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if attn.norm_added_k is not None:
        k_text = attn.norm_added_k(k_text)
    keys = torch.cat([k, k_text], dim=2).float()
    q = q.float()
    n, s = image.shape[1], text.shape[1]
    scale = q.shape[-1] ** -0.5
    total = torch.zeros(b, n, s, device=q.device)
    for h in range(q.shape[1]):
        total += ((q[:, h] @ keys[:, h].transpose(-1, -2)) * scale).softmax(dim=-1)[..., n:]
    return (total / q.shape[1])[:, None].detach()


@contextmanager
def capture_joint_text_attention(transformer: Any) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Wrap the processor of every joint attention of an SD3 transformer (each block's `attn`; SD3.5's second,
    image-only `attn2` is left as it is) in a JointAttentionTextRecorder.

    Yields {processor key: [(B, 1, N, S) per call]}. On exit the exact original processor objects are put back.
    HookError when `transformer` is already under this capture or another processor swap (hooks' registry)."""
    from difflens.engine.hooks import swap_processors

    def make(key: str, processor: Any, sink: dict[str, list[torch.Tensor]]) -> Any:
        return JointAttentionTextRecorder(key, sink, processor) if key.endswith(".attn.processor") else processor

    with swap_processors(transformer, make, "attention processors of this transformer", "transformer") as sink:
        yield sink
