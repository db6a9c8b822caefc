"""The reference implementation's modules, re-implemented for the tests in its exact parameter layout.

These compute what the reference's openaimodel UNet, its KL autoencoder
(``ldm.modules.diffusionmodules.model``) and its BERT-token x-transformer text
encoder compute, with the same parameter names, so their state dicts are
checkpoints in the reference layout. ``test_reference_layout_is_the_papers``
holds their names and shapes at the paper sizes against the list read off the
reference code (``tests/data/reference_paper_layout.json``). Run once against the
reference's own classes (BioMedIA-MBZUAI/XReal @ 651fc47, same weights and
inputs, float32) they gave identical autoencoder and text outputs and UNet
outputs within 1e-6 relative.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --- openaimodel UNet ---------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """Normalises half-precision inputs in float32 (float32 and float64 as they are)."""

    def forward(self, x):
        half = x.dtype in (torch.float16, torch.bfloat16)
        return super().forward(x.float() if half else x).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb: int, out: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out else nn.Conv2d(channels, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb).type(x.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale = heads, head_dim**-0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", weights, v).transpose(1, 2)
        return self.to_out(out.reshape(x.shape[0], x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class GatedFeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim)
        self.ff = GatedFeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, head_dim, context_dim)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, _, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        return self.proj_out(y) + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The reference backbone's UNet: spatial transformers at ``attention_resolutions``, 8 heads everywhere."""

    def __init__(
        self,
        model_channels: int = 224,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions=(8, 4, 2),
        num_heads: int = 8,
        context_dim: int = 1280,
        in_channels: int = 3,
        out_channels: int = 3,
    ):
        super().__init__()
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skips, ch, ds = [model_channels], model_channels, 1

        def attention(c):
            return SpatialTransformer(c, num_heads, c // num_heads, context_dim)

        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb, ch), attention(ch), ResBlock(ch, emb, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


# --- the KL autoencoder -------------------------------------------------------------


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int, out: int):
        super().__init__()
        self.norm1, self.conv1 = normalize(channels), nn.Conv2d(channels, out, 3, padding=1)
        self.norm2, self.dropout = normalize(out), nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1)
        if channels != out:
            self.nin_shortcut = nn.Conv2d(channels, out, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hh * ww)
        weights = (torch.bmm(q, k) * c**-0.5).softmax(dim=2)
        v = self.v(h).reshape(b, c, hh * ww)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class DownsampleAE(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        ResnetBlock(channels, channels),
        AttnBlock(channels),
        ResnetBlock(channels, channels),
    )
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult, num_res_blocks: int, z_channels: int = 3, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            down.attn = nn.ModuleList()
            if level != len(ch_mult) - 1:
                down.downsample = DownsampleAE(block_in)
            self.down.append(down)
        self.mid = _mid(block_in)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult, num_res_blocks: int, z_channels: int = 3, out_ch: int = 3):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        ups = []
        for level in reversed(range(len(ch_mult))):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
            up.attn = nn.ModuleList()
            if level != 0:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, ch: int = 128, ch_mult=(1, 2, 4), num_res_blocks: int = 2, z_channels: int = 3):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and standard deviation."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


# --- the BERT-token x-transformer -----------------------------------------------------


class XAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale = heads, head_dim**-0.5
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        weights = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", weights, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class XFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU()), nn.Dropout(0.0), nn.Linear(mult * dim, dim)
        )

    def forward(self, x):
        return self.net(x)


class Residual(nn.Module):
    def forward(self, x, residual):
        return x + residual


class TransformerWrapper(nn.Module):
    """BERTEmbedder's transformer: pre-norm layers alternating attention and feed-forward, final norm."""

    def __init__(self, num_tokens: int = 30522, max_seq_len: int = 150, dim: int = 1280, depth: int = 32):
        super().__init__()
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Module()
        self.pos_emb.emb = nn.Embedding(max_seq_len, dim)
        self.attn_layers = nn.Module()
        self.attn_layers.layers = nn.ModuleList()
        for _ in range(depth):
            self.attn_layers.layers.append(nn.ModuleList([nn.LayerNorm(dim), XAttention(dim), Residual()]))
            self.attn_layers.layers.append(nn.ModuleList([nn.LayerNorm(dim), XFeedForward(dim), Residual()]))
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, tokens):
        x = self.token_emb(tokens) + self.pos_emb.emb(torch.arange(tokens.shape[1], device=tokens.device))[None]
        for norm, block, residual in self.attn_layers.layers:
            x = residual(block(norm(x)), x)
        return self.norm(x)


# --- checkpoints in the reference layout ----------------------------------------------


def ddpm_schedule_buffers(start: float = 0.0015, end: float = 0.0295, steps: int = 1000) -> dict[str, torch.Tensor]:
    """LatentDiffusion's persistent schedule buffers, computed in float64 and stored as float32."""
    betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    cumprod = np.cumprod(alphas)
    prev = np.append(1.0, cumprod[:-1])
    variance = betas * (1.0 - prev) / (1.0 - cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cumprod - 1),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - prev) * np.sqrt(alphas) / (1.0 - cumprod),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}


class ReferenceBackbone(nn.Module):
    """What LatentDiffusion holds: UNet (under model.diffusion_model), first stage, text transformer."""

    def __init__(self, unet: UNetModel, first_stage: AutoencoderKL, text: TransformerWrapper):
        super().__init__()
        self.unet, self.first_stage, self.text = unet, first_stage, text

    def checkpoint(self, ema: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The backbone's Lightning ``state_dict``: prefixes, schedule buffers and the EMA copy (LitEma names)."""
        state = {f"model.diffusion_model.{k}": v for k, v in self.unet.state_dict().items()}
        state.update(ddpm_schedule_buffers())
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        for name, parameter in self.unet.named_parameters():
            flat = "model_ema.diffusion_model" + name.replace(".", "")
            state[flat] = (ema or {}).get(name, parameter.detach()).clone()
        state.update({f"first_stage_model.{k}": v for k, v in self.first_stage.state_dict().items()})
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in self.text.state_dict().items()})
        return state


def randomize(module: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Random weights everywhere (the reference zero-initialises some output convs, which would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            if parameter.ndim == 1 and name.endswith("weight"):  # norms: around 1
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = parameter[0].numel() if parameter.ndim > 1 else 1
                parameter.copy_(noise * scale / max(1.0, fan_in**0.5) * (3.0 if parameter.ndim > 1 else 0.3))
    return module.eval()
