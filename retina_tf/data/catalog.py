"""Catalog of the public retinal vessel datasets in their official folder layouts.

:func:`list_samples` turns a dataset folder into :class:`Sample` records (paths only; decode
them with :func:`retina_tf.data.io.read_sample`). Layouts under ``data_dir`` and splits:

* ``drive`` (Staal et al. 2004): ``{training,test}/images/NN_{training,test}.tif``,
  ``1st_manual/NN_manual1.gif``, ``mask/NN_*_mask.gif``; split by folder, 20 / 20.
* ``rite`` (AV-DRIVE, Hu et al. 2013): DRIVE images and masks, ``vessel/NN_*.png`` and
  ``av/NN_*.png`` (RGB A/V); split by folder, 20 / 20.
* ``synthetic``: the DRIVE layout plus ``av/NN_*.png`` (RGB A/V) written by
  :mod:`retina_tf.data.synthetic`; split by folder.
* ``chase_db1`` (Fraz et al. 2012): one flat folder of ``Image_NN{L,R}.jpg`` and
  ``Image_NN{L,R}_1stHO.png``; no FOV masks; images 01-10 training, 11-14 test (20 / 8).
* ``stare`` (Hoover et al. 2000): ``stare-images/imNNNN.ppm.gz`` and
  ``labels-ah/imNNNN.ah.ppm.gz``; no FOV masks; only the 20 labelled images are samples, the
  first ten (:data:`STARE_TRAINING`) training, the rest test.
* ``hrf`` (Budai et al. 2013): ``images/NN_{h,g,dr}.jpg`` (some ``.JPG``), ``manual1/NN_x.tif``,
  ``mask/NN_x_mask.tif``; per category images 01-05 training, the rest test.
* ``les_av`` (Orlando et al. 2018): ``images/N.png``, ``vessel-segmentations/N.png``,
  ``arteries-and-veins/N.png`` (RGB A/V), ``masks/N_mask.gif``; names sorted numerically,
  first half training, second half test (11 / 11).
* ``hrf_av`` (Hemelings et al. 2019): ``{training,test}/images/NN_x.jpg``,
  ``1st_manual/NN_x_AVmanual.png`` (index A/V map, also the vessel label), ``mask/NN_x_mask.tif``;
  split by folder, 24 / 21.

Rules that work on partial copies too (the repository's ``samples/`` folders): CHASE_DB1 splits
by image number, HRF by image number within each category, STARE by the fixed list of its first
ten labelled images, LES-AV by halves of the numerically sorted names found. A split that comes
out empty raises :class:`~retina_tf.data.io.DatasetError` naming the folder.

LES-AV A/V source: ``arteries-and-veins/`` (RGB). On the files it equals the binary
``arteries/`` and ``veins/`` exactly (red = artery only, blue = vein only, green = in both,
white = in neither but in ``vessel-segmentations/``), and it is the only one of the three that
also carries the uncertain pixels, so one file gives the full target.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path

from retina_tf.config import CHOICES
from retina_tf.data.io import IMAGE_SUFFIXES, DatasetError, PathLike

log = logging.getLogger(__name__)

DATASETS = ("drive", "chase_db1", "stare", "hrf", "rite", "les_av", "hrf_av", "synthetic")
SPLITS = CHOICES["eval_split"]

_OFFICIAL_NAMES = {"drive": "DRIVE", "chase_db1": "CHASE_DB1", "stare": "STARE", "hrf": "HRF",
                   "rite": "RITE", "les_av": "LES-AV", "hrf_av": "HRF-AV",
                   "synthetic": "synthetic"}
# (a .jfif or .webp photograph was left out of its split without a word)
_IMAGE_SUFFIXES = (".ppm.gz", ".pgm.gz", *IMAGE_SUFFIXES)
# The 20 labelled STARE images (Hoover et al., IEEE TMI 2000); the usual split trains on the
# first ten.
STARE_TRAINING = ("im0001", "im0002", "im0003", "im0004", "im0005", "im0044", "im0077", "im0081",
                  "im0082", "im0139")
_HRF_TRAINING_MAX = 5
_CHASE_TRAINING_MAX = 10


@dataclasses.dataclass(frozen=True)
class Sample:
    """Paths of one sample; ``None`` where the dataset has no such file.

    Attributes:
        dataset: dataset name from :data:`DATASETS`.
        name: sample name, the image file's stem (``"21_training"``, ``"Image_01L"``).
        image: the fundus image.
        label: binary vessel label (None for HRF-AV, whose vessel label is its A/V map).
        fov: FOV mask (None for STARE and CHASE_DB1: estimate it).
        av: artery/vein label file.
        av_format: ``"rgb"`` (RITE, LES-AV, synthetic) or ``"index"`` (HRF-AV).
    """

    dataset: str
    name: str
    image: Path
    label: Path | None = None
    fov: Path | None = None
    av: Path | None = None
    av_format: str | None = None


def _stem(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _require_dir(folder: Path, dataset: str, layout: str) -> Path:
    if not folder.is_dir():
        official = _OFFICIAL_NAMES[dataset]
        raise DatasetError(f"{folder} is not a folder: the official {official} layout expects "
                           f"{layout}")
    return folder


def _index(folder: Path, dataset: str, layout: str) -> dict[str, Path]:
    """Maps file stems to image files in a folder (extensions matched case-insensitively;
    hidden files such as macOS's ``._name`` copies skipped)."""
    files: dict[str, Path] = {}
    for path in sorted(_require_dir(folder, dataset, layout).iterdir()):
        stem = _stem(path)
        if stem is None or path.name.startswith(".") or not path.is_file():
            continue
        if stem in files:  # a converted copy beside the original: which one is meant?
            raise DatasetError(f"{files[stem]} and {path.name} are both {stem}: keep one of "
                               "them in this folder")
        files[stem] = path
    return files


def _lookup(files: dict[str, Path], stem: str, folder: Path, image: Path, what: str) -> Path:
    """The file named ``stem`` (in any case: renamed copies) in ``files``."""
    if stem in files:
        return files[stem]
    same = [path for key, path in files.items() if key.lower() == stem.lower()]
    if len(same) != 1:
        raise DatasetError(f"image {image} has no {what}: expected {folder / stem}.*")
    return same[0]


def _drive_like(dataset: str, root: Path, split: str) -> list[Sample]:
    """DRIVE, RITE and synthetic: one folder per split, files keyed by the image number."""
    label_folder = "vessel" if dataset == "rite" else "1st_manual"
    layout = (f"{{training,test}}/{{images,{label_folder},mask"
              + (",av}" if dataset in ("rite", "synthetic") else "}") + " under " + str(root))
    folder = root / split
    images = _index(folder / "images", dataset, layout)
    labels = _index(folder / label_folder, dataset, layout)
    masks = _index(folder / "mask", dataset, layout)
    avs = _index(folder / "av", dataset, layout) if dataset in ("rite", "synthetic") else None
    samples = []
    labelled: dict[Path, Path] = {}
    for stem, image in images.items():
        number = stem.split("_")[0]
        label_stem = stem if dataset == "rite" else f"{number}_manual1"
        label = _lookup(labels, label_stem, folder / label_folder, image, "vessel label")
        if label in labelled:  # 01_left.tif beside 01_test.tif: both keyed by "01"
            raise DatasetError(f"{label} would label both {labelled[label]} and {image}: the "
                               f"layout pairs files by the number before the first '_'; move "
                               "the photograph that is not NN_" + split + " out of "
                               + str(folder / "images"))
        labelled[label] = image
        fov = _lookup(masks, f"{stem}_mask", folder / "mask", image, "FOV mask")
        av = None if avs is None else _lookup(avs, stem, folder / "av", image, "A/V label")
        samples.append(Sample(dataset, stem, image, label, fov, av,
                              None if av is None else "rgb"))
    return samples


def _hrf_av(root: Path, split: str) -> list[Sample]:
    layout = f"{{training,test}}/{{images,1st_manual,mask}} under {root}"
    folder = root / split
    images = _index(folder / "images", "hrf_av", layout)
    avs = _index(folder / "1st_manual", "hrf_av", layout)
    masks = _index(folder / "mask", "hrf_av", layout)
    return [Sample("hrf_av", stem, image, None,
                   _lookup(masks, f"{stem}_mask", folder / "mask", image, "FOV mask"),
                   _lookup(avs, f"{stem}_AVmanual", folder / "1st_manual", image, "A/V label"),
                   "index")
            for stem, image in images.items()]


def _chase_db1(root: Path) -> list[Sample]:
    layout = f"Image_NN{{L,R}}.jpg and Image_NN{{L,R}}_1stHO.png in {root}"
    files = _index(root, "chase_db1", layout)
    samples = []
    for stem, image in files.items():
        if re.fullmatch(r"Image_\d+[LR]", stem, flags=re.I):  # image_01l.jpg too
            label = _lookup(files, f"{stem}_1stHO", root, image, "vessel label")
            samples.append(Sample("chase_db1", stem, image, label))
    return samples


def _stare(root: Path) -> list[Sample]:
    layout = f"stare-images/imNNNN.ppm.gz and labels-ah/imNNNN.ah.ppm.gz under {root}"
    images = _index(root / "stare-images", "stare", layout)
    labels = _index(root / "labels-ah", "stare", layout)
    samples = []
    # Only 20 of STARE's 400 images are labelled; the labels decide which images are samples.
    for label_stem, label in labels.items():
        stem = re.sub(r"\.ah$", "", label_stem, flags=re.I)
        if re.search(r"\.vk$", stem, flags=re.I):
            raise DatasetError(f"{label} is the second observer's label (.vk): it belongs in "
                               f"{root / 'labels-vk'}, not in labels-ah/")
        try:  # in any case: IM0001.PPM
            image = _lookup(images, stem, root / "stare-images", label, "image")
        except DatasetError:
            raise DatasetError(f"label {label} has no image: expected "
                               f"{root / 'stare-images' / stem}.ppm.gz") from None
        samples.append(Sample("stare", _stem(image), image, label))
    found = {s.name.lower() for s in samples}
    if missing := [name for name in STARE_TRAINING if name not in found]:
        _warn_once(f"warning: {root / 'labels-ah'} has no label of {', '.join(missing)}, "
                   f"of STARE's training split ({len(STARE_TRAINING) - len(missing)} of its "
                   f"{len(STARE_TRAINING)} images)")
    return samples


@functools.cache
def _warn_once(message: str) -> None:
    """Says ``message`` once per process: a command lists a dataset's splits several times."""
    log.warning(message)


def _hrf(root: Path) -> list[Sample]:
    layout = f"images/NN_{{h,g,dr}}.jpg, manual1/NN_x.tif, mask/NN_x_mask.tif under {root}"
    images = _index(root / "images", "hrf", layout)
    labels = _index(root / "manual1", "hrf", layout)
    masks = _index(root / "mask", "hrf", layout)
    return [Sample("hrf", stem, image,
                   _lookup(labels, stem, root / "manual1", image, "vessel label"),
                   _lookup(masks, f"{stem}_mask", root / "mask", image, "FOV mask"))
            for stem, image in images.items()]


def _les_av(root: Path) -> list[Sample]:
    layout = (f"images/N.png, vessel-segmentations/N.png, arteries-and-veins/N.png, "
              f"masks/N_mask.gif under {root}")
    images = _index(root / "images", "les_av", layout)
    labels = _index(root / "vessel-segmentations", "les_av", layout)
    avs = _index(root / "arteries-and-veins", "les_av", layout)
    masks = _index(root / "masks", "les_av", layout)
    return [Sample("les_av", stem, image,
                   _lookup(labels, stem, root / "vessel-segmentations", image, "vessel label"),
                   _lookup(masks, f"{stem}_mask", root / "masks", image, "FOV mask"),
                   _lookup(avs, stem, root / "arteries-and-veins", image, "A/V label"), "rgb")
            for stem, image in images.items()]


def _number(name: str) -> int:
    match = re.search(r"\d+", name)
    return int(match.group()) if match else -1


def _split_by(samples: list[Sample], split: str, is_training: Callable[[Sample], bool]
              ) -> list[Sample]:
    if split == "all":
        return samples
    return [s for s in samples if is_training(s) == (split == "training")]


def _halves(samples: list[Sample], split: str) -> list[Sample]:
    ordered = sorted(samples, key=lambda s: _number(s.name))
    first = (len(ordered) + 1) // 2
    return {"training": ordered[:first], "test": ordered[first:], "all": ordered}[split]


def guess_dataset(data_dir: PathLike) -> str | None:
    """The dataset whose official layout ``data_dir`` has, among those of WILeroy/retina_unet
    (DRIVE, CHASE_DB1): ``"drive"`` for ``training/{images,1st_manual,mask}`` (also the
    synthetic sets; ``"hrf_av"`` when the labels are ``*_AVmanual``), ``"chase_db1"`` for a
    flat folder of ``Image_NN{L,R}.jpg`` with ``Image_NN{L,R}_1stHO.png``; None otherwise."""
    root = Path(data_dir)
    training = root / "training"
    if all((training / sub).is_dir() for sub in ("images", "1st_manual", "mask")):
        av = any(p.name.split(".")[0].lower().endswith("_avmanual")
                 for p in (training / "1st_manual").iterdir())
        return "hrf_av" if av else "drive"
    # photographs and their labels (a folder of labels alone is no dataset), in any format
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    if any(re.fullmatch(r"Image_\d+[LR]_1stHO\.\w+", n, flags=re.I) for n in names) and any(
            re.fullmatch(r"Image_\d+[LR]\.\w+", n, flags=re.I) for n in names):
        return "chase_db1"
    return None


def dataset_key(dataset: str) -> str:
    """A dataset name as :data:`DATASETS` spells it, when it is one: ``"CHASE_DB1"`` and
    ``"LES-AV"`` as their folders are named give ``"chase_db1"`` and ``"les_av"``."""
    return str(dataset).strip().lower().replace("-", "_")


def normalize_dataset_name(dataset: str) -> str:
    """Maps ``"CHASE_DB1"``, ``"LES-AV"``, ``"hrf-av"`` ... to the names in :data:`DATASETS`."""
    name = dataset_key(dataset)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    return name


def official_folder(dataset: str) -> str:
    """The folder name a dataset unpacks to (``"DRIVE"``, ``"LES-AV"``), as the README's
    ``data/<DATASET>`` layout names it; the name as given where it is not in the catalog."""
    return _OFFICIAL_NAMES.get(dataset_key(dataset), dataset)


def list_samples(dataset: str, data_dir: PathLike, split: str = "training") -> list[Sample]:
    """Lists the samples of one split of a dataset in its official layout.

    Args:
        dataset: one of :data:`DATASETS` (case and ``-``/``_`` do not matter).
        data_dir: the dataset's own folder (e.g. ``.../DRIVE``), not the folder above it.
        split: ``"training"``, ``"test"`` or ``"all"``.

    Returns:
        Samples sorted by name (LES-AV numerically).

    Raises:
        DatasetError: for an unknown dataset or split, a missing folder (the message names the
            expected sub-folder and the official layout), an image without its label or mask,
            or a split with no samples.

    Example:
        >>> samples = list_samples("drive", "data/DRIVE", "test")  # doctest: +SKIP
        >>> samples[0].name, samples[0].label.name  # doctest: +SKIP
        ('01_test', '01_manual1.gif')
    """
    name = normalize_dataset_name(dataset)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    root = Path(data_dir)
    official = _OFFICIAL_NAMES[name]
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (expected the {official} "
                           "folder in its official layout)")
    try:
        samples, where = _list(name, root, split)
        if not samples:
            raise DatasetError(f"the {split!r} split of {official} in {where} is empty")
    except DatasetError as err:
        if (root / official).is_dir():
            raise DatasetError(f"{err}; did you mean data_dir={root / official}?") from err
        raise
    if name == "les_av":
        return sorted(samples, key=lambda s: (_number(s.name), s.name))
    return sorted(samples, key=lambda s: s.name)


def _list(name: str, root: Path, split: str) -> tuple[list[Sample], Path]:
    """Samples of one split and the folder to blame when there are none."""
    if name in ("drive", "rite", "synthetic", "hrf_av"):
        if split == "all":
            # Partial copies (samples/HRF-AV) hold only training/: list the folders present.
            folders = [s for s in ("training", "test") if (root / s).is_dir()] or ["training"]
        else:
            folders = [split]
        samples = []
        for folder in folders:
            if name == "hrf_av":
                samples += _hrf_av(root, folder)
            else:
                samples += _drive_like(name, root, folder)
        return samples, root / split if split != "all" else root
    if name == "chase_db1":
        return _split_by(_chase_db1(root), split,
                         lambda s: _number(s.name) <= _CHASE_TRAINING_MAX), root
    if name == "stare":
        return _split_by(_stare(root), split,
                         lambda s: s.name.lower() in STARE_TRAINING), root / "labels-ah"
    if name == "hrf":
        return _split_by(_hrf(root), split,
                         lambda s: _number(s.name) <= _HRF_TRAINING_MAX), root / "images"
    return _halves(_les_av(root), split), root / "images"
