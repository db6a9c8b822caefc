"""What the first-stage autoencoder learns from beyond L1 + KL: a perceptual distance, a patch discriminator and
a texture term.

Latent diffusion's autoencoder, which XReal's reference uses, is trained on
L1 + LPIPS + KL and, after a warm-up, a PatchGAN discriminator whose weight
adapts to the ratio of the reconstruction and adversarial gradients at the
decoder's last layer. L1 alone averages fine structure away: ribs, vessels,
small nodules. No pretrained LPIPS network can be downloaded here, so the
perceptual features come from a torchxrayvision DenseNet trained by this
project on the training set's own labels (:func:`train_perceptual_network`).

Neither kept the lungs' fine structure in the small demo autoencoder: its
round trip kept 0.48-0.57 of the high-frequency power of the phantoms' lungs,
and a backbone cannot draw finer than the decoder it feeds. The texture term
(:func:`texture_gap`) compares how much fine detail each small patch holds, not
where exactly it lies, so the decoder draws rib edges and vessels where L1
averages them away. Alone it let the decoder draw that detail as a grid of
lines across the lungs, whichever way the ribs ran; the structure term
(:func:`structure_gap`) compares which way each patch's detail runs as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

PERCEPTUAL_FILE = "perceptual.safetensors"


@dataclass(frozen=True)
class DetailLoss:
    """Weights and schedule of the terms added to L1 + KL.

    ``perceptual_weight`` multiplies the perceptual distance; the discriminator
    joins after ``discriminator_start`` steps, its term weighted adaptively
    times ``discriminator_weight``. ``discriminator_layers`` sets the patch
    size (2 layers: 34 px patches, 3 layers: 70 px). ``texture_weight``
    multiplies :func:`texture_gap`, ``structure_weight`` :func:`structure_gap`.
    """

    perceptual_weight: float = 1.0
    discriminator_start: int = 400
    discriminator_weight: float = 0.5
    discriminator_layers: int = 2
    discriminator_width: int = 32
    perceptual_steps: int = 600
    texture_weight: float = 0.0
    structure_weight: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


TEXTURE_SIGMA = 1.0  # pixels: the detail is what a Gaussian blur of this width takes away
TEXTURE_PATCH = 4  # pixels: the detail's power is compared per patch of this side


def fine_detail(images: torch.Tensor) -> torch.Tensor:
    """The fine detail of images ``[B, C, H, W]``: their grey level (channels averaged) minus its Gaussian blur of
    ``TEXTURE_SIGMA``, ``[B, 1, H, W]``."""
    gray = images.mean(1, keepdim=True)
    return gray - gaussian_blur(gray, [7, 7], [TEXTURE_SIGMA, TEXTURE_SIGMA])


def detail_rms(images: torch.Tensor) -> torch.Tensor:
    """Root mean square of the fine detail (image minus its Gaussian blur) per ``TEXTURE_PATCH`` patch:
    ``[B, 1, H / p, W / p]`` for images ``[B, C, H, W]`` (channels averaged)."""
    return (F.avg_pool2d(fine_detail(images) ** 2, TEXTURE_PATCH) + 1e-6).sqrt()


def texture_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image ``[B]``: the mean absolute difference of :func:`detail_rms` between ``a`` and ``b``."""
    return (detail_rms(a) - detail_rms(b)).abs().mean((1, 2, 3))


def detail_structure(images: torch.Tensor) -> torch.Tensor:
    """Which way the :func:`fine_detail` runs, per ``TEXTURE_PATCH`` patch: its structure tensor, the three entries
    as signed square roots, ``[B, 3, H / p, W / p]``."""
    detail = fine_detail(images)
    dx = F.pad(detail[..., :, 1:] - detail[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(detail[..., 1:, :] - detail[..., :-1, :], (0, 0, 0, 1))
    tensor = F.avg_pool2d(torch.cat([dx * dx, dy * dy, dx * dy], 1), TEXTURE_PATCH)
    return tensor.sign() * (tensor.abs() + 1e-6).sqrt()


def structure_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image ``[B]``: the mean absolute difference of :func:`detail_structure` between ``a`` and ``b``: unlike
    :func:`texture_gap`, a grid where ribs run across the lung does not match them."""
    return (detail_structure(a) - detail_structure(b)).abs().mean((1, 2, 3))


class PerceptualDistance(nn.Module):
    """An LPIPS-style distance: unit-normalised DenseNet features after each dense block, squared differences
    summed over channels, averaged over positions and summed over blocks. The network is frozen."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualDistance:
        super().train(mode)
        self.network.eval()  # batch norm keeps its statistics
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of images ``[B, C, H, W]`` in [-1, 1] (channels averaged, torchxrayvision's scale)."""
        x = images.mean(1, keepdim=True) * 1024.0
        found = []
        for name, module in self.network.features.named_children():
            x = module(x)
            if name.startswith("denseblock"):
                found.append(x)
        return found

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance ``[B]``."""
        total = torch.zeros(a.shape[0], device=a.device)
        for fa, fb in zip(self.features(a), self.features(b), strict=True):
            fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
            fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((fa - fb) ** 2).sum(1).mean((1, 2))
        return total


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017): one real-or-generated score per overlapping patch.

    Group norm instead of batch norm, so its output does not depend on the batch it sits in.
    """

    def __init__(self, channels: int = 3, width: int = 32, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        now = width
        for k in range(1, layers + 1):
            wider = width * min(2**k, 8)
            stride = 2 if k < layers else 1
            blocks += [nn.Conv2d(now, wider, 4, stride, 1, bias=False), nn.GroupNorm(8, wider), nn.LeakyReLU(0.2)]
            now = wider
        blocks.append(nn.Conv2d(now, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def perceptual_network(label_count: int) -> nn.Module:
    """The untrained small torchxrayvision DenseNet :func:`train_perceptual_network` trains (raw logits out)."""
    from xreal.judges.judging import build_phantom_classifier

    network = build_phantom_classifier([f"label {k}" for k in range(label_count)])
    network.op_threshs = None
    return network


def train_perceptual_network(images: torch.Tensor, labels: torch.Tensor, steps: int = 600, seed: int = 0) -> nn.Module:
    """Train a small torchxrayvision DenseNet to predict ``labels`` ``[N, L]`` (multi-label) from ``images``
    ``[N, C, H, W]`` in [-1, 1]; the features it learns are those :class:`PerceptualDistance` compares."""
    from xreal.judges.phantom_judges import fit

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = perceptual_network(labels.shape[1])
    inputs = images.mean(1, keepdim=True) * 1024.0
    loss = F.binary_cross_entropy_with_logits
    return fit(network, inputs, labels.float(), loss, steps, 1e-3, seed, "perceptual network")


def autoencoder_loss(
    model: AutoencoderKL,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    kl_weight: float,
    step: int = 0,
    detail: DetailLoss | None = None,
    perceptual: PerceptualDistance | None = None,
    discriminator: PatchDiscriminator | None = None,
) -> torch.Tensor:
    """One step's loss: L1 + KL, plus the perceptual, texture and adversarial terms when ``detail`` is given.

    The returned loss also holds the discriminator's hinge loss on detached
    reconstructions; the adversarial term reaches the discriminator only
    through detached weights, so one optimizer can step both networks.
    """
    posterior = model.encode(inputs).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device)
    reconstruction = model.decode(posterior.mean + posterior.std * noise).sample
    kl = kl_weight * posterior.kl().mean()
    nll = F.l1_loss(reconstruction, targets)
    if detail is None:
        return nll + kl
    if perceptual is not None and detail.perceptual_weight > 0:
        nll = nll + detail.perceptual_weight * perceptual(reconstruction, targets).mean()
    if detail.texture_weight > 0:
        nll = nll + detail.texture_weight * texture_gap(reconstruction, targets).mean()
    if detail.structure_weight > 0:
        nll = nll + detail.structure_weight * structure_gap(reconstruction, targets).mean()
    if discriminator is None or step < detail.discriminator_start:
        return nll + kl
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    adversarial = -torch.func.functional_call(discriminator, frozen, (reconstruction,)).mean()
    last = model.decoder.conv_out.weight
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_adv = torch.autograd.grad(adversarial, last, retain_graph=True)[0]
    weight = (grad_nll.norm() / (grad_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach() * detail.discriminator_weight
    hinge = 0.5 * (
        F.relu(1.0 - discriminator(targets)).mean() + F.relu(1.0 + discriminator(reconstruction.detach())).mean()
    )
    return nll + kl + weight * adversarial + hinge
