"""What difflens sends a Triton-hosted UNet and what it expects back, one definition for the client's start-up
check and for `difflens triton-serve`. Imports nothing (the server's environment has neither grpc nor difflens's
dependencies).

Per call, N samples (the batch dimension, split at the model's max_batch_size):

    sample                 (N, C, h, w)   the UNet's input latents        TYPE_FP32 or TYPE_FP16 (the model's dtype)
    timestep               (N, 1)         each sample's timestep          TYPE_FP32 (integers are exact up to 2**24)
    encoder_hidden_states  (N, L, D)      the prompt embeddings           the model's dtype
    noise_pred             (N, C_out, h, w) the UNet's output (eps, or v for a v-prediction model), the model's dtype

C, C_out and D are the UNet config's in_channels, out_channels and cross_attention_dim; a server may fix h, w and
L (an engine built for one resolution) or leave them -1.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
OUTPUT = "noise_pred"
INPUTS = (SAMPLE, TIMESTEP, ENCODER_HIDDEN_STATES)

# difflens dtype -> Triton's element type. No bfloat16: numpy, which tritonclient hands tensors over in, has none.
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
TIMESTEP_TYPE = "TYPE_FP32"
ANY = -1  # a dimension the server leaves free


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as a Triton model config declares it: dims without the batch dimension."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def unet_tensors(dtype: str, in_channels: int, out_channels: int, cross_attention_dim: int) \
        -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of a UNet with these config values at `dtype` ("float32" | "float16"); free dims ANY."""
    kind = TRITON_TYPES[dtype]
    inputs = (TensorSpec(SAMPLE, kind, (in_channels, ANY, ANY)),
              TensorSpec(TIMESTEP, TIMESTEP_TYPE, (1,)),
              TensorSpec(ENCODER_HIDDEN_STATES, kind, (ANY, cross_attention_dim)))
    return inputs, (TensorSpec(OUTPUT, kind, (out_channels, ANY, ANY)),)
