"""Exemplar-guided data synthesis (Cheap Lunch, section 2.1 / 3.2).

A few labelled slices ("exemplars") are turned into a training set of fixed size: every object (one per class) is
cut out of an exemplar, transformed (scale, rotation, flip, blur, intensity), and pasted roughly at its exemplar
position onto a transformed background slice that holds none of the target classes. Multi-class exemplars are
handled class by class and merged into one image (Cheap Lunch eq. 2-3).

Everything is deterministic from a seed (``numpy.random.Generator``); only numpy and scipy.ndimage are used for the
image work (matplotlib and nibabel only to write the result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from samadapt.data.dataset_writer import write_msd_dataset
from samadapt.errors import ConfigError, DataError
from samadapt.files import atomic_write

STRATEGIES = ("auto", "random", "most_classes")
MIN_SPACING = 2  # exemplars of one volume are kept more than this many slices apart (neighbours look alike)


# ----------------------------------------------------------------------------------------------------------- selection


def select_exemplars(
    slices,
    count: int,
    classes: Sequence[int],
    strategy: str = "auto",
    seed: int = 0,
    cases: Sequence[str] | None = None,
) -> list[int]:
    """Pick ``count`` exemplar slices (indices into the ``SliceDataset``) that hold at least one of ``classes``,
    from the volumes ``cases`` only when given (e.g. the training cases, so that no validation volume is used).

    Strategies (Cheap Lunch 3.2):
        ``random``: uniformly random slices holding a target class (single-target data such as BraTS).
        ``most_classes``: per volume, the slice holding the most target classes; ties go to the slice with the most
            labelled target pixels (read from the slice index, no volume is loaded), then to the lower slice number.
            Volumes are visited round-robin, each round ordered by the quality of each volume's next slice (so with
            fewer exemplars than volumes the volumes with the richest slices win), until ``count`` are chosen; a
            second slice of a volume must lie more than ``MIN_SPACING`` slices from the ones already taken there.
            If that spacing rule leaves too few slices, the skipped slices fill the remainder (best first).
        ``auto``: ``most_classes`` for several classes, ``random`` for one.

    Raises:
        ValueError: an unknown strategy or a non-positive count. DataError: unknown classes, or fewer candidate
            slices than ``count``.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown exemplar strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if count < 1:
        raise ConfigError(f"the exemplar count must be at least 1, got {count}")
    classes = [int(c) for c in classes]
    if not classes:
        raise ConfigError("select_exemplars needs at least one target class")
    # raises DataError for classes the dataset does not define
    candidates = slices.indices(classes, list(cases) if cases is not None else None)
    if len(candidates) < count:
        raise DataError(
            f"{slices.spec.root}: asked for {count} exemplars, but only {len(candidates)} slices along axis "
            f"{slices.axis} hold classes {classes}"
        )
    if strategy == "auto":
        strategy = "most_classes" if len(classes) > 1 else "random"
    if strategy == "random":
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(candidates), size=count, replace=False)
        return sorted(candidates[int(i)] for i in chosen)
    return _most_classes(slices, candidates, count, set(classes))


def _most_classes(slices, candidates: list[int], count: int, wanted: set[int]) -> list[int]:
    def score(i: int) -> tuple[int, int]:
        areas = slices.areas[i]
        return (sum(1 for c in wanted if areas.get(c, 0) > 0), sum(areas.get(c, 0) for c in wanted))

    per_case: dict[str, list[int]] = {}
    for i in candidates:
        per_case.setdefault(slices.slices[i][0], []).append(i)
    for ranked in per_case.values():
        ranked.sort(key=lambda i: (-score(i)[0], -score(i)[1], slices.slices[i][1]))

    chosen: list[int] = []
    taken: dict[str, list[int]] = {case: [] for case in per_case}
    skipped: list[int] = []
    queues = {case: list(ranked) for case, ranked in per_case.items()}
    case_order = list(per_case)
    while len(chosen) < count and any(queues.values()):
        # one slice per volume per round: the next slice of each volume that keeps its distance
        round_picks = []
        for case in case_order:
            queue = queues[case]
            while queue:
                i = queue.pop(0)
                z = slices.slices[i][1]
                if all(abs(z - t) > MIN_SPACING for t in taken[case]):
                    round_picks.append(i)
                    taken[case].append(z)
                    break
                skipped.append(i)
        round_picks.sort(key=lambda i: (-score(i)[0], -score(i)[1]))  # stable: dataset order breaks ties
        chosen.extend(round_picks[: count - len(chosen)])
    if len(chosen) < count:
        skipped.sort(key=lambda i: (-score(i)[0], -score(i)[1]))
        chosen.extend(skipped[: count - len(chosen)])
    return sorted(chosen)


def background_slices(
    slices,
    classes: Sequence[int] | None,
    cases: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    min_std: float = 0.01,
) -> list[int]:
    """Indices of slices that hold none of ``classes`` (None: no foreground at all) and are not blank.

    A slice is blank when its preprocessed image's standard deviation is at most ``min_std`` (air above the head,
    padding). With ``limit`` a seeded random subset of at most ``limit`` slices is returned; images are read in
    batches sorted by position so that volumes are not loaded over and over. The result is sorted.
    """
    wanted = set(slices.spec.classes) if classes is None else {int(c) for c in classes}
    case_set = set(cases) if cases is not None else None
    pool = [
        i
        for i, (case_id, _, present) in enumerate(slices.slices)
        if (case_set is None or case_id in case_set) and not wanted & set(present)
    ]
    if limit is not None:
        pool = [pool[int(k)] for k in np.random.default_rng(seed).permutation(len(pool))]
    target = len(pool) if limit is None else max(0, int(limit))
    found: list[int] = []
    batch = max(16, 2 * target)
    for start in range(0, len(pool), batch):
        for i in sorted(pool[start : start + batch]):
            if len(found) >= target:
                break
            if float(np.std(slices[i]["image"])) > min_std:
                found.append(i)
        if len(found) >= target:
            break
    return sorted(found)


def inpaint_objects(image: np.ndarray, label: np.ndarray, classes: Sequence[int] | None = None) -> np.ndarray:
    """The image with the pixels of ``classes`` (None: all foreground) filled from their nearest other pixel, smoothed.

    A fallback background when a dataset has no usable target-free slice (e.g. a skull-stripped brain where every
    non-blank slice holds grey or white matter): the exemplar itself, its objects wiped out, is the best guess at
    the surroundings. Crude (flat streaks inside large objects), but the pasted objects mostly cover those regions.
    """
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    hole = label > 0 if classes is None else np.isin(label, list(classes))
    if not hole.any():
        return image.copy()
    if hole.all():
        return np.full_like(image, float(image.mean()))
    # indices of the nearest pixel outside the hole, for every pixel
    _, (rows, cols) = ndimage.distance_transform_edt(hole, return_indices=True)
    filled = image[rows, cols]
    smooth = ndimage.gaussian_filter(filled, 2.0, mode="nearest")
    filled[hole] = smooth[hole]
    return filled


# ----------------------------------------------------------------------------------------------------------- synthesis


@dataclass
class SynthesisConfig:
    """Random transform ranges, each ``(low, high)`` sampled uniformly.

    Attributes:
        scale: object zoom factor. rotation: object rotation in degrees. flip_prob: chance of a left-right flip.
        blur_sigma: Gaussian blur of the object in pixels (0: none). intensity_gain / intensity_offset: the object's
            intensities become ``gain * x + offset``, clipped to [0, 1].
        jitter: the object's centre moves by up to this fraction of the image height / width from its exemplar
            position.
        background_flip_prob / background_rotation: the same for the background slice (degrees).
        exemplar_order: ``round_robin`` (every exemplar used equally often) or ``random``.
    """

    scale: tuple[float, float] = (0.8, 1.2)
    rotation: tuple[float, float] = (-20.0, 20.0)
    flip_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    intensity_gain: tuple[float, float] = (0.9, 1.1)
    intensity_offset: tuple[float, float] = (-0.05, 0.05)
    jitter: float = 0.05
    background_flip_prob: float = 0.5
    background_rotation: tuple[float, float] = (-10.0, 10.0)
    exemplar_order: str = "round_robin"

    def __post_init__(self) -> None:
        for name in ("scale", "rotation", "blur_sigma", "intensity_gain", "intensity_offset", "background_rotation"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not all(math.isfinite(v) for v in value) or value[0] > value[1]:
                raise ConfigError(f"SynthesisConfig.{name} must be a finite (low, high) range, got {value}")
            setattr(self, name, value)
        if self.scale[0] <= 0:
            raise ConfigError(f"SynthesisConfig.scale must be positive, got {self.scale}")
        if self.blur_sigma[0] < 0:
            raise ConfigError(f"SynthesisConfig.blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.intensity_gain[0] <= 0:
            raise ConfigError(f"SynthesisConfig.intensity_gain must be positive, got {self.intensity_gain}")
        for name in ("flip_prob", "background_flip_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"SynthesisConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= float(self.jitter) <= 0.5:
            raise ConfigError(f"SynthesisConfig.jitter must be a fraction in [0, 0.5], got {self.jitter}")
        if self.exemplar_order not in ("round_robin", "random"):
            raise ConfigError(
                f"SynthesisConfig.exemplar_order must be 'round_robin' or 'random', got {self.exemplar_order!r}"
            )


def synthesize(
    exemplars: Sequence[dict],
    backgrounds: Sequence[np.ndarray],
    size: int,
    config: SynthesisConfig | None = None,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> list[dict]:
    """Make exactly ``size`` synthetic slices from exemplar slices and target-free background slices.

    Each output uses one exemplar (``config.exemplar_order``) and one random background. The background is flipped /
    rotated; then every class of the exemplar (only ``classes`` when given) is cut out separately, scaled, rotated,
    flipped, blurred and re-intensified, and pasted with its centroid near its exemplar position (plus jitter); the
    same geometric transform moves image and mask (mask: nearest neighbour). Larger objects are pasted first so small
    ones stay visible; a later paste overwrites an earlier one, in image and label alike. Pixels outside the image
    are dropped.

    A background whose shape differs from the exemplar's is zoomed (bilinear, aspect kept) to cover the exemplar
    shape and centre-cropped to it.

    Args:
        exemplars: dicts with ``image`` float (H, W) in [0, 1] and ``label`` int (H, W) (``SliceDataset`` items).
        backgrounds: float (H', W') images in [0, 1].
        size: number of outputs.
        seed: same seed, same inputs -> identical outputs (each output draws from its own ``Generator([seed, k])``).

    Returns:
        dicts: ``image`` float32 (H, W) in [0, 1], ``label`` int64 (H, W), ``exemplar`` (index into ``exemplars``),
        ``background`` (index into ``backgrounds``), and the exemplar's ``case`` / ``slice`` when it had them.

    Raises:
        ValueError: no exemplars or backgrounds, a negative size, images that are not 2D.
    """
    config = config or SynthesisConfig()
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not exemplars:
        raise ValueError("synthesize needs at least one exemplar")
    if not backgrounds:
        raise ValueError("synthesize needs at least one background slice (a slice without the target classes)")
    for k, exemplar in enumerate(exemplars):
        image, label = np.asarray(exemplar["image"]), np.asarray(exemplar["label"])
        if image.ndim != 2 or image.shape != label.shape:
            raise ValueError(
                f"exemplar {k}: need a 2D image and a label of the same shape, got {image.shape}, {label.shape}"
            )
    for k, background in enumerate(backgrounds):
        if np.asarray(background).ndim != 2:
            raise ValueError(f"background {k}: need a 2D image, got shape {np.asarray(background).shape}")
    wanted = None if classes is None else {int(c) for c in classes}

    order_rng = np.random.default_rng([seed, 2**31])
    if config.exemplar_order == "random":
        picks = order_rng.integers(len(exemplars), size=size)
    else:
        picks = np.arange(size) % len(exemplars)
    items = []
    for k in range(size):
        rng = np.random.default_rng([seed, k])
        e = int(picks[k])
        exemplar = exemplars[e]
        ex_image = np.asarray(exemplar["image"], dtype=np.float32)
        ex_label = np.asarray(exemplar["label"])
        b = int(rng.integers(len(backgrounds)))
        image = _fit(np.asarray(backgrounds[b], dtype=np.float32), ex_image.shape)
        image = _transform_background(image, config, rng)
        label = np.zeros(ex_image.shape, dtype=np.int64)
        present = [int(c) for c in np.unique(ex_label) if c > 0 and (wanted is None or int(c) in wanted)]
        areas = {c: int(np.count_nonzero(ex_label == c)) for c in present}
        for c in sorted(present, key=lambda c: (-areas[c], c)):
            _paste_object(image, label, ex_image, ex_label == c, c, config, rng)
        item = {"image": np.clip(image, 0.0, 1.0).astype(np.float32), "label": label, "exemplar": e, "background": b}
        for key in ("case", "slice", "position"):  # the exemplar's: its objects keep their place
            if key in exemplar:
                item[key] = exemplar[key]
        items.append(item)
    return items


def _fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zoom (aspect kept) so the image covers ``shape``, then centre-crop: anatomy is not stretched."""
    if image.shape == tuple(shape):
        return image.copy()
    factor = max(shape[0] / image.shape[0], shape[1] / image.shape[1])
    zoomed = ndimage.zoom(image, factor, order=1, mode="nearest", grid_mode=True)
    # zoom rounds the output shape; pad by edge values if it came out a pixel short
    pad = [(0, max(0, s - z)) for s, z in zip(shape, zoomed.shape, strict=True)]
    zoomed = np.pad(zoomed, pad, mode="edge")
    r0 = (zoomed.shape[0] - shape[0]) // 2
    c0 = (zoomed.shape[1] - shape[1]) // 2
    return zoomed[r0 : r0 + shape[0], c0 : c0 + shape[1]]


def _transform_background(image: np.ndarray, config: SynthesisConfig, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < config.background_flip_prob:
        image = image[:, ::-1]
    angle = rng.uniform(*config.background_rotation)
    if angle != 0.0:
        # reflect, so the rotated corners show anatomy-like texture rather than black wedges
        image = ndimage.rotate(image, angle, reshape=False, order=1, mode="reflect")
    return np.ascontiguousarray(image, dtype=np.float32)


def _paste_object(
    image: np.ndarray,
    label: np.ndarray,
    ex_image: np.ndarray,
    mask: np.ndarray,
    class_id: int,
    config: SynthesisConfig,
    rng: np.random.Generator,
) -> None:
    """Transform one object of the exemplar and paste it into ``image`` / ``label`` in place."""
    H, W = image.shape
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return
    # draw every random number first, so the stream (hence the output) does not depend on image content
    scale = rng.uniform(*config.scale)
    angle = math.radians(rng.uniform(*config.rotation))
    flip = rng.random() < config.flip_prob
    sigma = rng.uniform(*config.blur_sigma)
    gain = rng.uniform(*config.intensity_gain)
    offset = rng.uniform(*config.intensity_offset)
    shift = rng.uniform(-config.jitter, config.jitter, size=2) * np.array([H, W])

    # crop the object with a margin for the blur kernel, then blur and re-intensify only that patch
    margin = int(math.ceil(3 * config.blur_sigma[1])) + 2
    r0, r1 = max(0, rows.min() - margin), min(H, rows.max() + 1 + margin)
    c0, c1 = max(0, cols.min() - margin), min(W, cols.max() + 1 + margin)
    patch = ex_image[r0:r1, c0:c1].astype(np.float32)
    patch_mask = mask[r0:r1, c0:c1].astype(np.uint8)
    if sigma > 1e-3:
        patch = ndimage.gaussian_filter(patch, sigma, mode="nearest")
    patch = np.clip(gain * patch + offset, 0.0, 1.0)
    if not patch_mask.all():
        # carry the object's own values outward, so bilinear sampling at its edge does not mix in the surroundings
        _, (near_r, near_c) = ndimage.distance_transform_edt(patch_mask == 0, return_indices=True)
        patch = patch[near_r, near_c]

    # forward map in (row, col): p_out = A (p_in - centre_in) + centre_out, A = scale * rotation * flip
    centre_in = np.array([rows.mean() - r0, cols.mean() - c0])
    centre_out = np.clip(np.array([rows.mean(), cols.mean()]) + shift, 0, [H - 1, W - 1])
    cos, sin = math.cos(angle), math.sin(angle)
    A = scale * np.array([[cos, -sin], [sin, cos]]) @ np.diag([1.0, -1.0 if flip else 1.0])
    inverse = np.linalg.inv(A)

    # only warp the output box the transformed object can reach, clipped to the image
    corners = np.array([[0, 0], [0, c1 - c0], [r1 - r0, 0], [r1 - r0, c1 - c0]], dtype=float) - 0.5
    reached = (corners - centre_in) @ A.T + centre_out
    q0 = np.maximum(np.floor(reached.min(axis=0)).astype(int) - 1, 0)
    q1 = np.minimum(np.ceil(reached.max(axis=0)).astype(int) + 2, [H, W])
    if np.any(q1 <= q0):
        return  # the object would land wholly outside the image
    out_shape = tuple(int(v) for v in q1 - q0)
    # scipy: out[o] = in[M o + b]; with o relative to q0, p_in = A^-1 (o + q0 - centre_out) + centre_in
    matrix_offset = inverse @ (q0 - centre_out) + centre_in
    warped = ndimage.affine_transform(patch, inverse, matrix_offset, out_shape, order=1, mode="nearest")
    warped_mask = ndimage.affine_transform(patch_mask, inverse, matrix_offset, out_shape, order=0, cval=0)
    region = (slice(q0[0], q1[0]), slice(q0[1], q1[1]))
    inside = warped_mask > 0
    image[region][inside] = warped[inside]
    label[region][inside] = class_id


# ----------------------------------------------------------------------------------------------------------- writing


def write_synthetic_dataset(
    items: Sequence[dict],
    out_dir: str | Path,
    classes: dict[int, str],
    name: str = "synthetic",
    modality: str = "MRI",
    preview: bool = True,
) -> Path:
    """Write synthetic slices as an MSD-style dataset of one-slice volumes; returns the dataset.json path.

    Layout: ``imagesTr/synth_0000.nii.gz`` (float32) and ``labelsTr/synth_0000.nii.gz`` (uint8 / uint16), each a
    (Z=1, Y, X) volume with unit spacing; ``dataset.json`` with the labels, ``training`` (each entry also names its
    source ``exemplar``), and ``"samadapt": {"preprocessing": "minmax", "axis": 0}`` because the images are already
    in [0, 1]. With ``preview``, ``preview.png`` shows the first 16 items (``save_preview_grid``).
    """
    import nibabel as nib

    out_dir = Path(out_dir)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    max_class = max([0, *classes])
    label_dtype = np.uint8 if max_class <= 255 else np.uint16
    training = []
    for k, item in enumerate(items):
        stem = f"synth_{k:04d}.nii.gz"
        image = np.asarray(item["image"], dtype=np.float32)
        label = np.asarray(item["label"])
        # NIfTI arrays are (X, Y, Z); samadapt reads them back transposed to (Z, Y, X) = (1, H, W)
        nifti = nib.Nifti1Image(image.T[:, :, None], np.eye(4))
        nifti.set_data_dtype(np.float32)
        nib.save(nifti, str(out_dir / "imagesTr" / stem))
        nifti = nib.Nifti1Image(label.astype(label_dtype).T[:, :, None], np.eye(4))
        nifti.set_data_dtype(label_dtype)
        nib.save(nifti, str(out_dir / "labelsTr" / stem))
        entry = {"image": f"./imagesTr/{stem}", "label": f"./labelsTr/{stem}"}
        if "exemplar" in item:
            entry["exemplar"] = int(item["exemplar"])
        training.append(entry)
    path = write_msd_dataset(
        out_dir,
        training,
        classes,
        modality,
        "minmax",
        name=name,
        description="exemplar-guided synthetic slices (samadapt synth, Cheap Lunch 2.1)",
        tensorImageSize="3D",
    )
    if preview and items:
        save_preview_grid(items, out_dir / "preview.png")
    return path


def save_preview_grid(items: Sequence[dict], path: str | Path, n: int = 16) -> Path:
    """Save a grid of the first ``n`` items: grey image with the label overlaid in colour (one colour per class)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    shown = list(items)[: max(1, n)]
    columns = max(1, math.ceil(math.sqrt(len(shown))))
    rows = max(1, math.ceil(len(shown) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), shown, strict=False):
        label = np.asarray(item["label"])
        ax.imshow(item["image"], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if label.any():
            ax.imshow(np.ma.masked_equal(label, 0), cmap="tab10", vmin=0, vmax=10, alpha=0.45, interpolation="nearest")
        title = f"ex {item['exemplar']}" if "exemplar" in item else ""
        ax.set_title(title, fontsize=7)
    figure.tight_layout()
    path = atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=80))
    plt.close(figure)
    return path
