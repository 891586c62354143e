"""The two ways to train a healthy-appearance model: on normal phantoms for the demo model
(``pacs-xai demo train-healthy``), or on a site's own normal studies for any model card
(``pacs-xai model train-healthy --normals DIR --card CARD``). Both write the model beside the card
(or into ``out_dir``) and the held-out reconstruction figure to ``figure``.

- Phantoms: :data:`PHANTOM_NORMALS` normal phantoms of ``settings.seed`` for training,
  :data:`HELD_OUT_NORMALS` normal and :data:`HELD_OUT_LESIONS` lesion phantoms (nodule and
  effusion in turn) of ``settings.seed + 1000`` held out. No phantom of the evaluation seed
  (424242) is used, and no lesion image is trained on.
- A folder: every frame below it through the card's pixel path; every :data:`HELD_OUT_EVERY`-th
  frame is held out. At least :data:`MIN_FRAMES` frames. They must all be normal: a lesion in the
  training set is a lesion the model learns to reproduce.
"""

from __future__ import annotations

from pathlib import Path

from service.inference.card import ModelCard
from service.models import demo_card_path
from service.tools.healthy.data import folder_normals, phantom_lesions, phantom_normals
from service.tools.healthy.figure import plot_reconstructions
from service.tools.healthy.train import HealthyReport, HealthySettings, HeldOutLesions, train_healthy_model
from service.tools.progress import Progress

__all__ = ["HELD_OUT_EVERY", "MIN_FRAMES", "train_on_folder", "train_on_phantoms"]

PHANTOM_NORMALS = 1200
HELD_OUT_NORMALS = 120
HELD_OUT_LESIONS = 40
#: Offset of the held-out phantoms' seed from the training seed.
HELD_OUT_SEED_OFFSET = 1000
#: With a folder, every this-many-th frame is held out.
HELD_OUT_EVERY = 10
#: Least number of frames a folder must give.
MIN_FRAMES = 20


def train_on_phantoms(
    out_dir: str | Path,
    figure: Path,
    settings: HealthySettings | None = None,
    progress: Progress = print,
    *,
    card_path: str | Path | None = None,
    normals: int = PHANTOM_NORMALS,
    held_out_normals: int = HELD_OUT_NORMALS,
    held_out_lesions: int = HELD_OUT_LESIONS,
) -> HealthyReport:
    """The demo model's healthy-appearance model (default card: the demo card), from phantoms."""
    settings = settings or HealthySettings()
    card_file = Path(card_path) if card_path is not None else demo_card_path()
    card = ModelCard.load(card_file)
    held_out_seed = settings.seed + HELD_OUT_SEED_OFFSET
    progress(f"generating {normals} normal phantoms (seed {settings.seed})")
    training = phantom_normals(card, normals, settings.seed, progress)
    progress(f"generating {held_out_normals} normal and {held_out_lesions} lesion phantoms (seed {held_out_seed})")
    held_out = phantom_normals(card, held_out_normals, held_out_seed)
    inputs, masks, labels = phantom_lesions(card, held_out_lesions, held_out_seed)
    lesions = HeldOutLesions(inputs, masks, labels)
    source = f"{normals} normal phantoms, seed {settings.seed}"
    report = train_healthy_model(
        card_file, training, held_out, out_dir, settings, progress, lesions=lesions, source=source
    )
    plot_reconstructions(report, lesions, figure, f"{card.name}: healthy appearance of held-out phantoms")
    return report


def train_on_folder(
    card_path: str | Path,
    normals_dir: Path,
    figure: Path,
    settings: HealthySettings | None = None,
    progress: Progress = print,
    *,
    out_dir: str | Path | None = None,
) -> HealthyReport:
    """A healthy-appearance model for the card at ``card_path`` from the normal images below
    ``normals_dir``, written into ``out_dir`` (default: the card's folder, whose card is updated)."""
    settings = settings or HealthySettings()
    card_file = Path(card_path)
    card_file = card_file / "model.yaml" if card_file.is_dir() else card_file
    card = ModelCard.load(card_file)
    progress(f"reading normal images below {normals_dir} through model {card.name}'s pixel path")
    frames = folder_normals(card, normals_dir, progress)
    if len(frames) < MIN_FRAMES:
        raise ValueError(f"{normals_dir}: {len(frames)} readable frame(s); training needs at least {MIN_FRAMES}")
    held = [index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for index in range(len(frames))]
    training = frames[[not h for h in held]]
    held_out = frames[held]
    target = Path(out_dir) if out_dir is not None else card.folder
    source = f"{len(frames)} frames below {normals_dir.name}"
    report = train_healthy_model(card_file, training, held_out, target, settings, progress, source=source)
    plot_reconstructions(report, None, figure, f"{card.name}: healthy appearance of held-out normal images")
    return report
