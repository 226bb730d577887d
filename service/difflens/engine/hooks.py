"""Capture inside the UNet: module outputs and their gradients, and cross-attention probabilities.

Capture only: these context managers collect tensors and compute nothing an explainer needs (the maps are built
in cam.py and attention.py). Each one restores exactly what it changed on exit, exceptions included, raises
HookError when the same module (or UNet) is already being captured, and never swallows an exception.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from difflens.errors import HookError

_lock = threading.Lock()
# Modules whose outputs are being captured, and UNets whose cross-attention processors are swapped: process-wide,
# so that two captures of the same module fail loudly whoever starts them. Weak: the registry never keeps a model
# alive.
_captured_modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_swapped_unets: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a module's output stands for: itself, or the first tensor of a tuple, list or BaseOutput
    (e.g. Transformer2DModel returns Transformer2DModelOutput(sample=...) or (sample,))."""
    if isinstance(output, torch.Tensor):
        return output
    candidates = list(output.values()) if isinstance(output, dict) else output  # BaseOutput is an OrderedDict
    if isinstance(candidates, tuple | list):
        for v in candidates:
            if isinstance(v, torch.Tensor):
                return v
    raise HookError(f"cannot capture a module output of type {type(output).__name__}: it holds no tensor")


def image_stream(output: Any) -> torch.Tensor:
    """The image tokens of a transformer block's output: FLUX's double- and single-stream blocks and SD3's joint
    blocks return (text tokens, image tokens) (SD3's last block None for the text); the last tensor is the image's."""
    if isinstance(output, tuple | list):
        tensors = [v for v in output if isinstance(v, torch.Tensor)]
        if tensors:
            return tensors[-1]
    return first_tensor(output)


def _claim(registry: weakref.WeakSet, items: Sequence[nn.Module], names: Sequence[str], what: str) -> None:
    with _lock:
        busy = [n for n, m in zip(names, items, strict=True) if m in registry]
        if busy:
            raise HookError(f"{what} already being captured: {', '.join(busy)}")
        for m in items:
            registry.add(m)


def _release(registry: weakref.WeakSet, items: Sequence[nn.Module]) -> None:
    with _lock:
        for m in items:
            registry.discard(m)


class Capture:
    """What `capture_outputs` collected, by module path.

    activations[path]: the module's output of the last forward (detached), e.g. (B, K, h_l, w_l) for a resnet;
    gradients[path]: d(target)/d(output), same shape, filled by the backward pass (absent until then, and absent
    if the output did not require grad).
    """

    def __init__(self) -> None:
        self.activations: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}


@contextmanager
def capture_outputs(root: nn.Module, paths: Sequence[str],
                    select: Callable[[Any], torch.Tensor] = first_tensor) -> Iterator[Capture]:
    """Capture the forward output and its gradient of each module `root.get_submodule(path)`.

    A forward hook stores the output (`select` of it: the first tensor of a tuple / BaseOutput; `image_stream` for
    a transformer block) and, when it requires grad,
    registers a tensor hook that stores its gradient. Forward and tensor hooks are removed on exit. One forward per
    context: a module that runs twice raises HookError, since its activation and gradient could then come from
    different calls (a UNet calls each of its blocks once per forward).
    Raises HookError if one of the modules is already being captured; AttributeError for an unknown path.
    """
    paths = list(dict.fromkeys(paths))
    modules = [root.get_submodule(p) for p in paths]
    _claim(_captured_modules, modules, paths, "module(s)")
    cap = Capture()
    handles: list[Any] = []

    def make_hook(path: str):
        def store_grad(grad: torch.Tensor) -> None:
            cap.gradients[path] = grad.detach()

        def on_forward(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if path in cap.activations:
                raise HookError(f"module {path} ran twice while captured; capture one forward at a time")
            out = select(output)
            cap.activations[path] = out.detach()
            if out.requires_grad:
                handles.append(out.register_hook(store_grad))

        return on_forward

    try:
        for path, module in zip(paths, modules, strict=True):
            handles.append(module.register_forward_hook(make_hook(path)))
        yield cap
    finally:
        for h in handles:
            h.remove()
        _release(_captured_modules, modules)


class CrossAttentionRecorder:
    """An attention processor for one cross-attention layer that records its attention probabilities.

    It computes attention the way diffusers' AttnProcessor does (explicit softmax(Q K^T / sqrt(d)) through
    `attn.get_attention_scores`) and returns the layer's normal output; `sink[name]` gets one
    (B, heads, N, S) tensor per call (N = h_l * w_l query pixels, S = text tokens), detached.
    """

    def __init__(self, name: str, sink: dict[str, list[torch.Tensor]]) -> None:
        self.name = name
        self.sink = sink

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """hidden_states: (B, N, C) or (B, C, h_l, w_l); encoder_hidden_states: (B, S, D). -> same as input."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, N, S)
        self.sink.setdefault(self.name, []).append(probs.detach().reshape(batch, attn.heads, *probs.shape[1:]))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def is_cross_attention(processor_key: str) -> bool:
    """Whether an `attn_processors` key names a cross-attention layer (attn2 of a transformer block)."""
    return processor_key.endswith("attn2.processor")


@contextmanager
def capture_cross_attention(unet: Any) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Swap every cross-attention (attn2) processor of `unet` for a CrossAttentionRecorder.

    Yields {processor key: [(B, heads, N, S) per call]}. Every other processor stays as it was, and on exit the
    exact original processor objects are put back (identity, not copies). HookError when `unet` is already under
    this capture.
    """
    with swap_processors(unet, lambda k, p, sink: CrossAttentionRecorder(k, sink) if is_cross_attention(k) else p,
                         "cross-attention processors of this UNet", "UNet") as sink:
        yield sink


Recorder = Callable[[str, Any, dict[str, list[torch.Tensor]]], Any]


@contextmanager
def swap_processors(model: Any, make: Recorder, what: str, kind: str) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Set every attention processor of `model` to make(key, original, sink) (the original itself to leave one
    as it is) and yield the sink the recorders fill; on exit the exact original processor objects are put back
    (identity, not copies). HookError naming `what` when `model` is already under a processor swap."""
    _claim(_swapped_unets, [model], [what], kind)
    sink: dict[str, list[torch.Tensor]] = {}
    try:
        originals = dict(model.attn_processors)
        swapped = {k: make(k, p, sink) for k, p in originals.items()}
        try:
            model.set_attn_processor(swapped)
            yield sink
        finally:
            model.set_attn_processor(dict(originals))  # set_attn_processor consumes the dict it is given
    finally:
        _release(_swapped_unets, [model])


class JointAttentionRecorder:
    """FLUX's attention processor for one block, wrapping the block's own (FluxAttnProcessor), that records the
    attention of the image tokens' queries to the text tokens' keys.

    The block's output is the wrapped processor's, unchanged. The probabilities are computed again beside it the
    way FluxAttnProcessor computes attention (q, k projections, RMS norms, the text's added projections in a
    double-stream block, rotary embedding, softmax(q k^T / sqrt(d)) over all keys, text and image), one head at
    a time, and only the image-query x text-key block is kept, averaged over heads: `sink[name]` gets one
    (B, 1, N, S) tensor per call (N image tokens, S text tokens), detached, float32. A double-stream block gets the
    text as encoder_hidden_states; a single-stream block gets [text; image] concatenated, its first `text_len`
    tokens the text's.
    """

    def __init__(self, name: str, sink: dict[str, list[torch.Tensor]], processor: Any, text_len: int) -> None:
        self.name = name
        self.sink = sink
        self.processor = processor
        self.text_len = text_len

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        """hidden_states: (B, N, C) image tokens, or (B, S + N, C) text and image; encoder_hidden_states: (B, S, C)
        or None. -> the wrapped processor's output."""
        out = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        with torch.no_grad():
            probs = self._text_probs(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        self.sink.setdefault(self.name, []).append(probs)
        return out

    def _text_probs(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                    rotary: Any) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))  # (B, L, H, d)

        query, key = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))
        text_len = self.text_len
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        q, k = query[:, text_len:].transpose(1, 2).float(), key.transpose(1, 2).float()  # (B, H, N, d), (B, H, L, d)
        scale = q.shape[-1] ** -0.5
        total = torch.zeros(q.shape[0], q.shape[2], text_len, device=q.device)
        for h in range(q.shape[1]):  # one head at a time: a head's N x L logits, not all heads' at once
            total += ((q[:, h] @ k[:, h].transpose(-1, -2)) * scale).softmax(dim=-1)[..., :text_len]
        return (total / q.shape[1])[:, None].detach()


@contextmanager
def capture_joint_attention(transformer: Any, text_len: int) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Wrap every attention processor of a FLUX transformer (its double- and single-stream blocks' `attn`) in a
    JointAttentionRecorder; `text_len`: the text tokens' count S (the embeddings' length).

    Yields {processor key: [(B, 1, N, S) per call]}. On exit the exact original processor objects are put back.
    HookError when `transformer` is already under this capture or capture_cross_attention."""
    with swap_processors(transformer, lambda k, p, sink: JointAttentionRecorder(k, sink, p, text_len),
                         "attention processors of this transformer", "transformer") as sink:
        yield sink
