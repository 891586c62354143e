"""``pacs-xai demo train-saliency``: train the real-time saliency masker for the demo model.

The masker (:class:`~service.explain.methods.realtime.SaliencyMasker`) learns, against the frozen demo
classifier, the objective of Dabkowski & Gal (2017) for a mask ``m`` of image ``x`` and class ``c``::

    lambda1 * TV(m) + lambda2 * area(m) - log f_c(phi(x, m)) + lambda3 * f_c(phi(x, 1 - m)) ** lambda4

``f_c`` is the classifier's softmax probability of ``c``; ``phi(x, m) = m * x + (1 - m) * a``
keeps the masked region of ``x`` and replaces the rest by an alternative image ``a``, drawn per
sample as in the paper: a random constant with Gaussian noise, or the image blurred (Gaussian,
``blur_sigma`` pixels; off by default, see ``SaliencySettings.blur_fraction``). ``TV`` is the
mean squared difference of neighbouring mask pixels, ``area`` the mean of the mask. With
probability ``fake_fraction`` a sample asks for a class other than its own (a *fake* class, as in
the paper); then only ``TV`` and ``area`` apply, so the mask of a class that is not there shrinks
to nothing. Masks are computed by :class:`~service.explain.methods.realtime.SaliencyMasker` at a quarter
of the input size with softly bounded logits.

As the paper's masker starts from a pretrained encoder, ours starts from the demo classifier's
own convolutional features (same layout) and keeps them frozen; the class selector starts from
the classifier's (zero-sum) class weights, i.e. the feature filter starts as a sigmoid of the
class activation map. The upsampler learns from scratch. Training images are phantoms generated
on the fly through the node's pixel path (:func:`service.tools.demo.train.phantom_arrays`); the
held-out phantoms (another seed) measure the result: the pointing game of the mask peak against
the lesion masks, the classifier's probability when the masked region is removed or kept alone,
and the mask area for classes that are absent. Seeded; the same settings give the same weights
(about 30 s on 2 idle cores with the defaults).

The masker is written as ``saliency-masker.pt`` into the output folder. When that is the model
card's own folder, the card's ``auxiliary.saliency_masker`` entry (file and sha256) is updated
too, as ``pacs-xai demo train`` writes the card beside the weights; the node then gives the
masker to the ``realtime_saliency`` explainer. Elsewhere the card is left alone (a masker in a
scratch folder is used by setting the explainer's ``masker``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dicom_io.pixels import PreparedFrame, prepare_frames
from service.explain.methods.perturbation import gaussian_blur
from service.explain.methods.realtime import CARD_ENTRY, MASKER_FILE, SaliencyMasker, save_masker
from service.explain.scores import LOG_PROBABILITY, PROBABILITY, target_scores
from service.inference.card import ModelCard, set_auxiliary_file
from service.models import demo_card_path
from service.models.demo.network import DemoNet
from service.synthetic.phantoms import CLASSES, make_phantom
from service.tools.demo.train import INPUT_SPEC, normalise, phantom_arrays
from service.tools.progress import Progress

__all__ = ["SaliencyReport", "SaliencySettings", "train_saliency_masker"]

#: Held-out phantoms come from a different seed than any training image (of the masker or the model).
HELD_OUT_SEED_OFFSET = 1000
#: Share of the top mask pixels removed in the deletion figure.
DELETION_FRACTION = 0.02


@dataclass(frozen=True)
class SaliencySettings:
    """What ``pacs-xai demo train-saliency`` does; the defaults reproduce the shipped masker."""

    train_per_class: int = 90
    held_out_per_class: int = 20
    epochs: int = 4
    batch_size: int = 16
    learning_rate: float = 2e-3
    seed: int = 11
    #: lambda1: weight of the total variation (mean squared neighbour difference) of the mask.
    tv_weight: float = 10.0
    #: lambda2: weight of the mask area, the mean of ``(m + 0.0005) ** area_power`` (with power 1 the
    #: mean of the mask; a power below 1, as in the authors' code, favours masks that are 0 or 1).
    area_weight: float = 5.0
    area_power: float = 1.0
    #: lambda3, lambda4: weight and power of the probability left when the masked region is removed.
    destroy_weight: float = 5.0
    destroy_power: float = 0.3
    #: Share of samples asked for a class they do not show (mask should come out empty).
    fake_fraction: float = 0.3
    #: Share of alternatives that are the blurred image (the rest: constant plus noise). The paper
    #: blurs half of them; here 0, because the demo model reads any blur as effusion (measured on
    #: held-out phantoms: the whole image blurred with sigma 3 px gives p(effusion) = 1.00 for every
    #: class), so no small mask could preserve a nodule against a blurred background.
    blur_fraction: float = 0.0
    blur_sigma: float = 10.0
    #: Standard deviation of the noise added to the constant alternative (normalised units).
    noise_std: float = 0.2
    #: Mask logits are bounded softly to +-logit_bound (see :class:`SaliencyMasker`).
    logit_bound: float = 6.0
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("train_per_class", "held_out_per_class", "epochs", "batch_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("fake_fraction", "blur_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("learning_rate", "blur_sigma", "destroy_power", "area_power", "logit_bound"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("tv_weight", "area_weight", "destroy_weight", "noise_std"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SaliencyReport:
    """Held-out figures of the trained masker and where it was written."""

    figures: dict[str, float]
    seconds: float
    path: Path
    #: The model card whose ``auxiliary.saliency_masker`` now names the masker; ``None`` when the
    #: masker was written outside the card's folder and the card was left alone.
    card: Path | None = None


@dataclass(frozen=True)
class HeldOut:
    """Held-out phantoms: normalised inputs, labels, their frames (grid mapping) and lesion masks."""

    inputs: torch.Tensor  # [N, 1, H, W]
    labels: torch.Tensor  # [N]
    frames: list[PreparedFrame]
    lesion_masks: list[np.ndarray]  # bool, source grid


def held_out_phantoms(per_class: int, seed: int) -> HeldOut:
    """``per_class`` phantoms of each class, varied like the training set, with their lesion masks."""
    variants = [("CR", "MONOCHROME2"), ("DX", "MONOCHROME2"), ("CR", "MONOCHROME1"), ("DX", "MONOCHROME1")]
    inputs, labels, frames, masks = [], [], [], []
    for index in range(per_class * len(CLASSES)):
        label = index % len(CLASSES)
        modality, photometric = variants[index % len(variants)]
        phantom = make_phantom(
            index,
            CLASSES[label],
            seed=seed,
            cols=(448, 480, 512)[index % 3],
            modality=modality,
            photometric=photometric,  # type: ignore[arg-type]
        )
        frame = prepare_frames(phantom.dataset, INPUT_SPEC)[0]
        inputs.append(normalise(frame.model_input))
        labels.append(label)
        frames.append(frame)
        masks.append(phantom.lesion_mask)
    return HeldOut(torch.from_numpy(np.stack(inputs)), torch.tensor(labels), frames, masks)


def load_classifier(card_path: Path) -> tuple[DemoNet, ModelCard]:
    """The demo classifier from the card's torch weights: eval mode, no gradients for its parameters."""
    card = ModelCard.load(card_path)
    weights = card.weights.get("torch")
    if weights is None:
        raise ValueError(f"model card {card_path} ships no torch state dict; the masker needs the eager model")
    model = DemoNet(num_classes=len(card.output.classes), in_channels=card.input.channels)
    model.load_state_dict(torch.load(card.weights_path("torch"), map_location="cpu", weights_only=True))
    model.eval().requires_grad_(False)
    return model, card


def initial_masker(classifier: DemoNet, seed: int, logit_bound: float = 6.0) -> SaliencyMasker:
    """A masker whose encoder and selector start from the classifier (encoder frozen), upsampler seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        masker = SaliencyMasker(
            num_classes=classifier.classifier.out_features,
            in_channels=classifier.features.stem[0].in_channels,
            logit_bound=logit_bound,
        )
    masker.encoder.load_state_dict(classifier.features.state_dict())
    masker.encoder.requires_grad_(False)
    with torch.no_grad():
        masker.selector.weight.copy_(classifier.classifier.centred_weight())
        bias = classifier.classifier.bias
        masker.selector_bias.weight.copy_((bias - bias.mean())[:, None])
    return masker


def alternatives(images: torch.Tensor, settings: SaliencySettings, generator: torch.Generator) -> torch.Tensor:
    """Per sample, the blurred image or a random constant (over the normalised range) plus noise."""
    count = images.shape[0]
    blurred = gaussian_blur(images, settings.blur_sigma) if settings.blur_fraction > 0 else images
    colour = torch.rand(count, 1, 1, 1, generator=generator) * 4 - 2  # [0, 1] inputs are [-2, 2] normalised
    noise = torch.randn(images.shape, generator=generator) * settings.noise_std
    use_blur = torch.rand(count, 1, 1, 1, generator=generator) < settings.blur_fraction
    return torch.where(use_blur, blurred, colour + noise)


def total_variation(masks: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and horizontally neighbouring pixels, per sample ``[B]``."""
    rows = (masks[..., 1:, :] - masks[..., :-1, :]).pow(2).flatten(1).mean(1)
    cols = (masks[..., :, 1:] - masks[..., :, :-1]).pow(2).flatten(1).mean(1)
    return rows + cols


def saliency_loss(
    masker: SaliencyMasker,
    classifier: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    fake: torch.Tensor,
    alternative: torch.Tensor,
    settings: SaliencySettings,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's objective, averaged over the batch, and its parts (for progress lines)."""
    masks = masker(images, targets)
    tv, area = total_variation(masks), masks.flatten(1).mean(1)
    area_term = area if settings.area_power == 1 else (masks + 5e-4).pow(settings.area_power).flatten(1).mean(1)
    per_sample = settings.tv_weight * tv + settings.area_weight * area_term
    real = (~fake).nonzero()[:, 0]
    preserve = destroy = torch.zeros(())
    if len(real):
        m, x, a, c = masks[real], images[real], alternative[real], targets[real]
        logits = classifier(torch.cat([m * x + (1 - m) * a, (1 - m) * x + m * a]))
        log_p = target_scores(logits, torch.cat([c, c]), LOG_PROBABILITY)
        preserve = -log_p[: len(real)]
        destroy = settings.destroy_weight * torch.exp(settings.destroy_power * log_p[len(real) :])
        per_sample = per_sample.index_add(0, real, preserve + destroy)
    parts = {
        "preserve": float(preserve.detach().sum()) / max(1, len(real)),
        "destroy": float(destroy.detach().sum()) / max(1, len(real)),
        "area": float(area.detach().mean()),
    }
    return per_sample.mean(), parts


def train_saliency_masker(
    out_dir: str | Path,
    settings: SaliencySettings = SaliencySettings(),
    progress: Progress = print,
    card_path: str | Path | None = None,
) -> SaliencyReport:
    """Train the masker for the model of ``card_path`` (default: the demo card); write it to ``out_dir``
    and, when ``out_dir`` is the card's folder, point the card's ``auxiliary.saliency_masker`` at it."""
    started = time.perf_counter()
    card_file = Path(card_path) if card_path is not None else demo_card_path()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        classifier, card = load_classifier(card_file)
        count = settings.train_per_class * len(CLASSES)
        progress(f"generating {count} training phantoms (seed {settings.seed})")
        train_x, train_y = phantom_arrays(settings.train_per_class, settings.seed, progress)
        progress(f"generating {settings.held_out_per_class * len(CLASSES)} held-out phantoms")
        held_out = held_out_phantoms(settings.held_out_per_class, settings.seed + HELD_OUT_SEED_OFFSET)
        masker = initial_masker(classifier, settings.seed, settings.logit_bound)
        figures = _fit(
            masker,
            classifier,
            torch.from_numpy(train_x),
            torch.from_numpy(train_y),
            held_out,
            settings,
            progress,
            started,
        )
        masker.eval()
        metadata = {
            "method": "real-time saliency (Dabkowski & Gal, 2017)",
            "model": {
                "name": card.name,
                "version": card.version,
                "torch_sha256": card.weights["torch"].sha256,
                "classes": list(card.output.classes),
            },
            "normalisation": {"mean": list(card.input.mean), "std": list(card.input.std)},
            "training": dataclasses.asdict(settings),
            "held_out": figures,
            "rebuild": "pacs-xai demo train-saliency",
        }
        path = save_masker(Path(out_dir) / MASKER_FILE, masker, INPUT_SPEC.rows, INPUT_SPEC.columns, metadata)
    finally:
        torch.set_num_threads(previous_threads)
    updated = None
    if path.parent.resolve() == card.folder.resolve():
        set_auxiliary_file(card_file, CARD_ENTRY, path)
        updated = card_file
        progress(f"model card {card_file}: auxiliary.{CARD_ENTRY} -> {path.name}")
    else:
        progress(f"model card {card_file} left as it is: the masker is not in its folder")
    return SaliencyReport(figures, time.perf_counter() - started, path, updated)


def _fit(
    masker: SaliencyMasker,
    classifier: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    held_out: HeldOut,
    settings: SaliencySettings,
    progress: Progress,
    started: float,
) -> dict[str, float]:
    """The training loop; returns the held-out figures after the last epoch."""
    trainable = [p for p in masker.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=1e-4)
    steps = settings.epochs * math.ceil(len(inputs) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings.learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(settings.seed)
    classes = len(CLASSES)
    figures: dict[str, float] = {}
    for epoch in range(settings.epochs):
        masker.train()
        masker.encoder.eval()  # frozen: batch-norm statistics stay the classifier's
        order = torch.randperm(len(inputs), generator=generator)
        totals = {"loss": 0.0, "preserve": 0.0, "destroy": 0.0, "area": 0.0}
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            images, targets = inputs[idx], labels[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            fake = torch.rand(len(idx), generator=generator) < settings.fake_fraction
            shift = torch.randint(1, classes, (len(idx),), generator=generator)
            targets = torch.where(fake, (targets + shift) % classes, targets)
            alternative = alternatives(images, settings, generator)
            optimiser.zero_grad()
            loss, parts = saliency_loss(masker, classifier, images, targets, fake, alternative, settings)
            loss.backward()
            optimiser.step()
            schedule.step()
            for key, value in (("loss", loss.item()), *parts.items()):
                totals[key] += value * len(idx)
        figures = evaluate_masker(masker, classifier, held_out)
        mean = {key: value / len(inputs) for key, value in totals.items()}
        progress(
            f"epoch {epoch + 1}/{settings.epochs}: loss {mean['loss']:.4f} (preserve {mean['preserve']:.3f}, "
            f"destroy {mean['destroy']:.3f}, area {mean['area']:.3f}), held-out pointing game "
            f"nodule {figures['pointing_nodule']:.0%} effusion {figures['pointing_effusion']:.0%} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    return figures


def evaluate_masker(
    masker: SaliencyMasker, classifier: nn.Module, held_out: HeldOut, fill: float = 0.0
) -> dict[str, float]:
    """Held-out figures (all means over images):

    - ``pointing_nodule`` / ``pointing_effusion``: share of lesion images whose mask peak (on the
      source grid) lies inside the lesion mask, for the true class;
    - ``p_clean``, ``p_mask_removed``, ``p_mask_kept``: the classifier's probability of the true
      class on lesion images as they are, with the masked region removed ``phi(x, 1 - m)``, and
      with only the masked region kept ``phi(x, m)``; removed pixels take the constant ``fill``
      (normalised units; 0 is the card's mean, mid-grey);
    - ``p_top2_removed`` / ``p_random2_removed``: the same after removing the top 2 % mask pixels,
      or a random region of the same size (:func:`random_regions`);
    - ``area_true``: mask area for the true class of lesion images; ``area_absent``: for classes
      not in the image (the lesion classes on normal images).
    """
    masker.eval()
    inputs, labels = held_out.inputs, held_out.labels
    lesion = (labels != CLASSES.index("normal")).nonzero()[:, 0]
    normal = (labels == CLASSES.index("normal")).nonzero()[:, 0]
    with torch.no_grad():
        masks = masker(inputs, labels)[:, 0]
        absent = torch.cat([masker(inputs[normal], torch.full_like(labels[normal], k))[:, 0] for k in (1, 2)])
        x, m, c = inputs[lesion], masks[lesion][:, None], labels[lesion]
        filled = torch.full_like(x, fill)
        top = top_fraction(m, DELETION_FRACTION)
        random = random_regions(m.shape, DELETION_FRACTION, torch.Generator().manual_seed(0))
        batches = [x, m * filled + (1 - m) * x, m * x + (1 - m) * filled]
        batches += [torch.where(top, filled, x), torch.where(random, filled, x)]
        probabilities = [target_scores(classifier(b), c, PROBABILITY).mean() for b in batches]
    figures = {}
    for name in ("nodule", "effusion"):
        hits = []
        for i in (labels == CLASSES.index(name)).nonzero()[:, 0].tolist():
            source = held_out.frames[i].mapping.to_source_grid(masks[i].numpy())
            hits.append(bool(held_out.lesion_masks[i][np.unravel_index(np.argmax(source), source.shape)]))
        figures[f"pointing_{name}"] = float(np.mean(hits)) if hits else float("nan")
    names = ("p_clean", "p_mask_removed", "p_mask_kept", "p_top2_removed", "p_random2_removed")
    figures.update({name: float(p) for name, p in zip(names, probabilities)})
    figures["area_true"] = float(masks[lesion].mean())
    figures["area_absent"] = float(absent.mean()) if len(absent) else float("nan")
    return figures


def random_regions(shape: torch.Size, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean ``shape`` ``[N, 1, H, W]``: per image, ``fraction`` of the pixels in a few random blobs.

    The top pixels of uniform noise on a 7 x 7 grid upsampled bilinearly: contiguous regions, as
    a mask's top pixels are (scattered single pixels would be a different, harsher perturbation).
    """
    coarse = torch.rand(shape[0], 1, 7, 7, generator=generator)
    smooth = F.interpolate(coarse, size=tuple(shape[-2:]), mode="bilinear", align_corners=False)
    return top_fraction(smooth, fraction)


def top_fraction(masks: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean, same shape as ``masks`` ``[N, 1, H, W]``: each image's ``fraction`` highest pixels."""
    flat = masks.flatten(1)
    keep = max(1, round(fraction * flat.shape[1]))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(1, flat.topk(keep, dim=1).indices, True)
    return chosen.view_as(masks)
