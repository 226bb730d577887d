"""Model families, the torch side: how each one turns a prompt into its denoiser's conditioning and calls the
denoiser. What a family's folder holds (components, pipeline class names) is engine/model_config.FamilySpec, read
without torch by the front as well.

Everything family-specific that the sampler, the explainers and the worker need goes through a `Family`:

- `encode`: prompt and negative prompt -> `Prompt`: embeddings (2, L, D) = [negative; prompt], the added
  conditioning per branch ({name: (2, ...)}, or None) and the prompt's token ids from the first tokenizer;
- `call`: the denoiser's forward (runner.DenoiserCall), the one place that knows its signature: every UNet call
  of the engine (runner.raw / guided, DF-CAM's forward with gradients, the attention maps' forward, the worker's
  shared DF-RISE batches) passes the added conditioning through it;
- `check`: load-time consistency of the loaded components (ModelLoadError naming the file and field);
- `conditioning_shapes`: per-sample shapes of embeddings and added conditioning, for the memory estimate;
- `upcast_vae`: decode in float32 where the model asks for it (SDXL's VAE overflows in float16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from difflens.engine import flux, sd3
from difflens.engine.runner import Added, CFGConditioning, DenoiserCall, RemoteUNet, UNetRunner, unet_call
from difflens.errors import ModelLoadError

if TYPE_CHECKING:
    from difflens.engine.loading import Model
    from difflens.engine.options import Backend


@dataclass(frozen=True)
class Prompt:
    """A prompt encoded for CFG. embeds: (2, L, D) = [negative; prompt]; added: {name: (2, ...)} or None;
    token_ids: the prompt's L ids from the first tokenizer (what the attention maps' words index)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None
    token_ids: list[int]


def _ids(tokenizer: Any, text: str, length: int | None = None) -> torch.Tensor:
    """(1, L) token ids, padded and truncated to `length` (default: the tokenizer's model_max_length)."""
    n = tokenizer.model_max_length if length is None else length
    return tokenizer(text, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids


class StableDiffusion:
    """SD 1.x / 2.x and pixel-space UNets: one CLIP text encoder, its last hidden state as the embeddings."""

    name = "sd"
    upcast_vae = False
    call: DenoiserCall = staticmethod(unet_call)

    def encode(self, model: Model, prompt: str, negative_prompt: str, size: tuple[int, int]) -> Prompt:
        """As StableDiffusionPipeline.encode_prompt: both prompts padded to the tokenizer's length. size: (H, W),
        unused here."""
        ids = _ids(model.tokenizer, prompt)
        neg = _ids(model.tokenizer, negative_prompt, ids.shape[-1])
        with torch.no_grad():
            enc = model.text_encoder
            pos_e = enc(ids.to(model.device), attention_mask=None)[0]
            neg_e = enc(neg.to(model.device), attention_mask=None)[0]
        return Prompt(torch.cat([neg_e, pos_e]).to(model.dtype), None, ids[0].tolist())

    def check(self, model: Model) -> None:
        return None

    def timestep_kwargs(self, model: Model, size: tuple[int, int], steps: int) -> dict[str, Any]:
        """Extra keyword arguments of a flow-matching scheduler's set_timesteps for an image of `size` (H, W) in
        `steps` steps, as the family's pipeline passes them: `mu` under dynamic shifting (computed from the
        image's token count), `sigmas` where the pipeline lays out its own uniform schedule. The sampler gives
        `mu` to exponential and explicit lists too and replaces `sigmas` with theirs (schedule.flow_sigmas). SD
        and SDXL have none."""
        return {}

    def conditioning(self, model: Model, prompt: Prompt, scale: float) -> CFGConditioning:
        """The guided calls' conditioning for a request's guidance scale: classifier-free guidance over the
        prompt's two branches (a one-branch family, FLUX, puts the scale elsewhere)."""
        return CFGConditioning(prompt.embeds, scale, prompt.added)

    def latent_channels(self, model: Model) -> int:
        """Channels of the latent the sampler draws and steps (the UNet's input)."""
        return int(model.unet.config.in_channels)

    def conditioning_shapes(self, model: Model) -> tuple[tuple[int, int], dict[str, tuple[int, ...]]]:
        """((L, D), {}) per sample."""
        return (int(model.tokenizer.model_max_length), int(model.unet.config.cross_attention_dim)), {}


class StableDiffusionXL(StableDiffusion):
    """SDXL: CLIP ViT-L (text_encoder) and OpenCLIP bigG with projection (text_encoder_2). The embeddings are both
    encoders' penultimate hidden states concatenated per token position, (L, 768 + 1280); the added conditioning is
    text_encoder_2's pooled projection ("text_embeds", (P,)) and the micro-conditioning "time_ids" (original size,
    crop's top-left corner, target size: (H, W, 0, 0, H, W), as the pipeline's defaults)."""

    name = "sdxl"
    upcast_vae = True

    def encode(self, model: Model, prompt: str, negative_prompt: str, size: tuple[int, int]) -> Prompt:
        """As StableDiffusionXLPipeline.encode_prompt with prompt_2 = prompt. An empty negative prompt is the
        pipeline's negative_prompt=None: zeros for both branches' negative embeddings where model_index.json's
        force_zeros_for_empty_prompt is true (SDXL base's default), else the encoded empty string."""
        ids = [_ids(tok, prompt) for tok in self._tokenizers(model)]
        embeds, pooled = self._encode(model, ids)
        if not negative_prompt and model.options.get("force_zeros_for_empty_prompt", True):
            neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            length = embeds.shape[1]
            neg_embeds, neg_pooled = self._encode(model, [_ids(tok, negative_prompt, length)
                                                          for tok in self._tokenizers(model)])
        h, w = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=model.dtype, device=model.device)
        added = {"text_embeds": torch.cat([neg_pooled, pooled]).to(model.dtype), "time_ids": time_ids.repeat(2, 1)}
        return Prompt(torch.cat([neg_embeds, embeds]).to(model.dtype), added, ids[0][0].tolist())

    def _encode(self, model: Model, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: (1, L) per tokenizer -> embeddings (1, L, D1 + D2) and text_encoder_2's pooled projection (1, P)."""
        hidden, pooled = [], None
        with torch.no_grad():
            for enc, tokens in zip(self._encoders(model), ids, strict=True):
                out = enc(tokens.to(model.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both
                pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            raise ValueError("text_encoder_2 gave no pooled projection (text_embeds)")
        return torch.cat(hidden, dim=-1), pooled

    @staticmethod
    def _tokenizers(model: Model) -> tuple[Any, Any]:
        return model.tokenizer, model.components["tokenizer_2"]

    @staticmethod
    def _encoders(model: Model) -> tuple[Any, Any]:
        return model.text_encoder, model.components["text_encoder_2"]

    def check(self, model: Model) -> None:
        """The UNet's added embedding and cross-attention width against the two encoders (ModelLoadError naming
        unet/config.json and the key): what the pipeline finds only at the first call."""
        config, where = model.unet.config, str(model.path / "unet" / "config.json")
        te1, te2 = (enc.config for enc in self._encoders(model))
        if config.get("addition_embed_type") != "text_time":
            raise ModelLoadError(where, f"addition_embed_type: got {config.get('addition_embed_type')!r}; an SDXL "
                                        "UNet takes 'text_time' (pooled text embeddings and time ids)")
        want = int(config.addition_time_embed_dim) * 6 + int(te2.projection_dim)
        got = int(model.unet.add_embedding.linear_1.in_features)
        if got != want:
            raise ModelLoadError(where, f"projection_class_embeddings_input_dim: got {got}; expected {want} (6 time "
                                        f"ids x addition_time_embed_dim {config.addition_time_embed_dim} + "
                                        f"text_encoder_2's projection_dim {te2.projection_dim})")
        width = int(te1.hidden_size) + int(te2.hidden_size)
        if int(config.cross_attention_dim) != width:
            raise ModelLoadError(where, f"cross_attention_dim: got {config.cross_attention_dim}; expected {width} "
                                        "(text_encoder's and text_encoder_2's hidden sizes together)")

    def conditioning_shapes(self, model: Model) -> tuple[tuple[int, int], dict[str, tuple[int, ...]]]:
        """((L, D1 + D2), {"text_embeds": (P,), "time_ids": (6,)}) per sample."""
        (seq, dim), _ = super().conditioning_shapes(model)
        proj = int(model.components["text_encoder_2"].config.projection_dim)
        return (seq, dim), {"text_embeds": (proj,), "time_ids": (6,)}


class Flux(StableDiffusion):
    """FLUX.1 (FluxTransformer2DModel): T5's sequence as the embeddings (model.text_encoder / model.tokenizer: T5 is
    the family's first encoder, so the attention maps' words and the prompt limit are T5's) and CLIP's pooled output
    ("pooled_projections", (P,)) as added conditioning. One branch, no classifier-free guidance: FLUX-dev is
    guidance-distilled and takes the request's guidance scale as an input ("guidance", embedded by the transformer
    where its config has guidance_embeds); FLUX-schnell has no guidance input and ignores the scale. Latents are the
    VAE's (C, h, w); `call` packs them into 2 x 2 patch tokens and back (engine/flux.py)."""

    name = "flux"
    call: DenoiserCall = staticmethod(flux.flux_call)

    def encode(self, model: Model, prompt: str, negative_prompt: str, size: tuple[int, int]) -> Prompt:
        """As FluxPipeline.encode_prompt: T5's last hidden state over the prompt padded to the T5 tokenizer's length
        (FluxPipeline's max_sequence_length), CLIP's pooled output over it padded to 77. embeds (1, L, D): one
        branch; `negative_prompt` must be empty (validate.resolve_generation refuses one first)."""
        if negative_prompt:
            raise ValueError("FLUX has no negative branch: negative_prompt must be empty")
        ids = _ids(model.tokenizer, prompt)
        clip_ids = _ids(model.components["tokenizer"], prompt)
        with torch.no_grad():
            embeds = model.text_encoder(ids.to(model.device), output_hidden_states=False)[0]
            pooled = model.components["text_encoder"](clip_ids.to(model.device), output_hidden_states=False)
        added = {"pooled_projections": pooled.pooler_output.to(model.dtype)}
        return Prompt(embeds.to(model.dtype), added, ids[0].tolist())

    def conditioning(self, model: Model, prompt: Prompt, scale: float) -> CFGConditioning:
        """One branch (prompt.embeds is (1, L, D), so CFG is off whatever the scale); a guidance-distilled model
        gets the scale as added["guidance"] (1,), float32 as the pipeline passes it."""
        added = dict(prompt.added or {})
        if model.unet.config.get("guidance_embeds", False):
            added["guidance"] = torch.full([1], scale, device=model.device, dtype=torch.float32)
        return CFGConditioning(prompt.embeds, scale, added)

    def latent_channels(self, model: Model) -> int:
        """The VAE's latent channels: the transformer's in_channels are 4 of them per 2 x 2 patch."""
        return int(model.unet.config.in_channels) // (flux.PATCH * flux.PATCH)

    def timestep_kwargs(self, model: Model, size: tuple[int, int], steps: int) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas linspace(1, 1/n, n) (none where the scheduler makes its own flow sigmas)
        and `mu` from the image's packed token count (h/2 x w/2 of the latent)."""
        import numpy as np

        f = model.vae_scale_factor * flux.PATCH
        config = model.scheduler.config
        kwargs: dict[str, Any] = {"mu": flux.mu((size[0] // f) * (size[1] // f), config)}
        if not config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        return kwargs

    def check(self, model: Model) -> None:
        """The transformer's text and latent widths against the encoders and the VAE (ModelLoadError naming
        transformer/config.json and the key): what the pipeline finds only at the first call."""
        config, where = model.unet.config, str(model.path / "transformer" / "config.json")
        t5, clip = model.text_encoder.config, model.components["text_encoder"].config
        wants = [("joint_attention_dim", int(t5.d_model), "text_encoder_2's (T5's) d_model"),
                 ("pooled_projection_dim", int(clip.hidden_size), "text_encoder's (CLIP's) hidden_size")]
        if model.vae is not None:
            wants.append(("in_channels", 4 * int(model.vae.config.latent_channels),
                          "4 x the VAE's latent_channels (2 x 2 patches per token)"))
        for key, want, what in wants:
            if int(config.get(key)) != want:
                raise ModelLoadError(where, f"{key}: got {config.get(key)}; expected {want} ({what})")

    def conditioning_shapes(self, model: Model) -> tuple[tuple[int, int], dict[str, tuple[int, ...]]]:
        """((L, D), {"pooled_projections": (P,)} and, guidance-distilled, "guidance": ()) per sample."""
        config = model.unet.config
        added: dict[str, tuple[int, ...]] = {"pooled_projections": (int(config.pooled_projection_dim),)}
        if config.get("guidance_embeds", False):
            added["guidance"] = ()
        return (int(model.tokenizer.model_max_length), int(config.joint_attention_dim)), added


class StableDiffusion3(StableDiffusion):
    """SD3 / SD3.5 (SD3Transformer2DModel, flow matching). Two CLIP encoders with projection and an optional T5
    (text_encoder_3 / tokenizer_3 declared [null, null]: zeros in its place, as the pipeline has them). The
    embeddings are (77 + 256, D): both CLIPs' penultimate hidden states concatenated per token position and
    zero-padded to T5's width D (the transformer's joint_attention_dim), then T5's 256 tokens along the sequence;
    the added conditioning is both CLIPs' pooled projections concatenated ("pooled_projections", (P,)). The first
    tokenizer (CLIP) gives the prompt's words: the attention maps read the first 77 text positions, CLIP's."""

    name = "sd3"
    call: DenoiserCall = staticmethod(sd3.sd3_call)

    def encode(self, model: Model, prompt: str, negative_prompt: str, size: tuple[int, int]) -> Prompt:
        """As StableDiffusion3Pipeline.encode_prompt with prompt_2 = prompt_3 = prompt (the negative the same way;
        an empty one is encoded as "", as the pipeline does for negative_prompt=None)."""
        embeds, pooled, ids = self._encode(model, prompt)
        neg_embeds, neg_pooled, _ = self._encode(model, negative_prompt)
        added = {"pooled_projections": torch.cat([neg_pooled, pooled]).to(model.dtype)}
        return Prompt(torch.cat([neg_embeds, embeds]).to(model.dtype), added, ids)

    def _encode(self, model: Model, text: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """text -> embeddings (1, 77 + 256, D), pooled (1, P1 + P2), the first tokenizer's ids."""
        length = int(model.tokenizer.model_max_length)  # the pipeline pads both CLIPs to the first's length
        ids = [_ids(tok, text, length) for tok in (model.tokenizer, model.components["tokenizer_2"])]
        hidden, pooled = [], []
        with torch.no_grad():
            for enc, tokens in zip((model.text_encoder, model.components["text_encoder_2"]), ids, strict=True):
                out = enc(tokens.to(model.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled.append(out[0])
            t5 = self._t5(model, text)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1), ids[0][0].tolist()

    @staticmethod
    def _t5(model: Model, text: str) -> torch.Tensor:
        """T5's last hidden state (1, 256, D), or zeros of that shape without T5."""
        encoder = model.components.get("text_encoder_3")
        if encoder is None:
            width = int(model.unet.config.joint_attention_dim)
            return torch.zeros(1, sd3.T5_LENGTH, width, device=model.device, dtype=model.text_encoder.dtype)
        ids = _ids(model.components["tokenizer_3"], text, sd3.T5_LENGTH)
        return encoder(ids.to(model.device))[0]

    def timestep_kwargs(self, model: Model, size: tuple[int, int], steps: int) -> dict[str, Any]:
        """`mu` from the image's patch-token count where the scheduler shifts dynamically (as the pipeline does);
        SD3's own configs shift by a fixed `shift` (3.0) and need none."""
        config = model.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        f = model.vae_scale_factor * int(model.unet.config.patch_size)
        return {"mu": flux.mu((size[0] // f) * (size[1] // f), config)}

    def check(self, model: Model) -> None:
        """The transformer's text, pooled and latent widths against the encoders and the VAE (ModelLoadError naming
        transformer/config.json and the key): what the pipeline finds only at the first call, or never (a CLIP
        wider than T5 would be cut by the padding)."""
        config, where = model.unet.config, str(model.path / "transformer" / "config.json")
        te1, te2 = model.text_encoder.config, model.components["text_encoder_2"].config
        width, joint = int(te1.hidden_size) + int(te2.hidden_size), int(config.joint_attention_dim)
        wants = [("pooled_projection_dim", int(te1.projection_dim) + int(te2.projection_dim),
                  "text_encoder's and text_encoder_2's projection_dim together")]
        t5 = model.components.get("text_encoder_3")
        if t5 is not None:
            wants.append(("joint_attention_dim", int(t5.config.d_model), "text_encoder_3's (T5's) d_model"))
        if model.vae is not None:
            wants.append(("in_channels", int(model.vae.config.latent_channels), "the VAE's latent_channels"))
        for key, want, what in wants:
            if int(config.get(key)) != want:
                raise ModelLoadError(where, f"{key}: got {config.get(key)}; expected {want} ({what})")
        if joint < width:
            raise ModelLoadError(where, f"joint_attention_dim: got {joint}; must be at least {width} (text_encoder's "
                                        "and text_encoder_2's hidden sizes together, zero-padded to it)")

    def conditioning_shapes(self, model: Model) -> tuple[tuple[int, int], dict[str, tuple[int, ...]]]:
        """((77 + 256, joint_attention_dim), {"pooled_projections": (P,)}) per sample."""
        config = model.unet.config
        seq = int(model.tokenizer.model_max_length) + sd3.T5_LENGTH
        return (seq, int(config.joint_attention_dim)), {"pooled_projections": (int(config.pooled_projection_dim),)}


Family = StableDiffusion  # the interface every family implements (SD3 and FLUX: subclasses or look-alikes)
FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), Flux(),
                                                   StableDiffusion3())}


def of(model: Model) -> Family:
    """The loaded model's family behaviour."""
    return FAMILIES[model.family.name]


def runner(model: Model, backend: Backend = "eager", remote: RemoteUNet | None = None) -> UNetRunner:
    """The model's UNet runner, calling its denoiser the family's way."""
    return UNetRunner(model.unet, backend, remote=remote, call=of(model).call)


__all__ = ["FAMILIES", "Added", "Family", "Flux", "Prompt", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL",
           "of", "runner"]
