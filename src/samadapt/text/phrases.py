"""Phrase books: the texts that name each class (or several classes at once), split into training phrases and
held-out phrases that training never sees.

Generated from the dataset.json class names: templates ("the {name}", "segment the {name}", ...), a small table of
synonyms ("grey matter" / "gray matter" / "cortical grey matter"), laterality rewrites ("left kidney" / "kidney on the
left side") and the modality ("{name} on this MRI slice"). Phrases naming several classes ("grey matter and white
matter", "both kidneys", "all labelled structures") are supervised with the union of their masks.

A user may give their own phrases in a YAML file (``prompt.phrases``)::

    classes:               # class id or dataset.json name -> training phrases (replace the generated ones)
      1: [cortex, grey matter of the brain]
      white matter: [cerebral white matter]
    heldout:               # optional: phrases for evaluation only (default: the generated held-out phrases)
      1: [outer layer of the brain]
    groups:                # optional: phrases naming several classes (the union of their masks)
      - classes: [1, 2]
        phrases: [brain tissue, brain parenchyma]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from samadapt.errors import PhraseFileError

# words a class name may contain -> other ways to say them (first: the canonical spelling)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "grey matter": ("grey matter", "gray matter", "cortical grey matter", "grey matter tissue"),
    "white matter": ("white matter", "cerebral white matter", "white matter tissue"),
    "lesion": ("lesion", "tumour", "tumor", "abnormal mass", "pathological region"),
    "tumour": ("tumour", "tumor", "lesion", "neoplasm"),
    "tumor": ("tumor", "tumour", "lesion", "neoplasm"),
    "kidney": ("kidney", "renal parenchyma"),
    "liver": ("liver", "hepatic parenchyma"),
    "spleen": ("spleen", "splenic tissue"),
    "pancreas": ("pancreas", "pancreatic tissue"),
    "stomach": ("stomach", "gastric wall"),
    "gallbladder": ("gallbladder", "gall bladder"),
    "aorta": ("aorta", "aortic lumen"),
    "nodule": ("nodule", "lesion"),
    "edema": ("edema", "oedema", "swelling"),
}
MODALITY_WORDS = {"MRI": "MRI", "MR": "MRI", "CT": "CT", "T1": "MRI", "T2": "MRI", "FLAIR": "MRI"}

TRAIN_TEMPLATES = (
    "{x}",
    "the {x}",
    "segment the {x}",
    "a mask of the {x}",
    "outline the {x}",
    "the {x} region",
    "the {x} on this {m} slice",
    "find the {x} in the {m} image",
)
# never used in training: what ``samadapt evaluate --prompt text`` asks with
HELDOUT_TEMPLATES = ("please highlight every pixel of {x} in this scan",)


@dataclass
class TextTarget:
    """A set of classes and the phrases that name it.

    Attributes:
        targets: dataset class ids; a phrase naming several is supervised with the union of their masks.
        name: the plain class name(s), as dataset.json spells them.
        train: phrases drawn at random in training.
        heldout: phrases for evaluation only (never in ``train``).
    """

    targets: tuple[int, ...]
    name: str
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.targets = tuple(sorted(int(t) for t in self.targets))
        seen = set(self.train)
        self.heldout = [p for p in self.heldout if p not in seen]


@dataclass
class PhraseBook:
    """Every text target of a run: one per class (``single``) and the multi-class ones (``groups``)."""

    entries: list[TextTarget]

    @property
    def single(self) -> dict[int, TextTarget]:
        return {e.targets[0]: e for e in self.entries if len(e.targets) == 1}

    @property
    def groups(self) -> list[TextTarget]:
        return [e for e in self.entries if len(e.targets) > 1]

    def for_class(self, class_id: int) -> TextTarget:
        try:
            return self.single[int(class_id)]
        except KeyError:
            raise KeyError(f"the phrase book has no phrases for class {class_id}") from None

    def groups_with(self, class_id: int) -> list[TextTarget]:
        return [e for e in self.groups if class_id in e.targets]

    def training_phrases(self) -> set[str]:
        return {p for e in self.entries for p in e.train}

    def to_dict(self) -> dict:
        return {"entries": [{**asdict(e), "targets": list(e.targets)} for e in self.entries]}

    @classmethod
    def from_dict(cls, data: dict) -> PhraseBook:
        return cls([TextTarget(**entry) for entry in data["entries"]])


# atlas names abbreviate sides and positions (AAL: ``Frontal_Mid_L``, ``Temporal_Sup_R``); a sentence encoder reads
# "frontal mid l" and "frontal mid r" as the same text (one letter apart), so the two sides could not be told apart
SIDES = {"l": "left", "r": "right", "lt": "left", "rt": "right", "lh": "left", "rh": "right"}
ABBREVIATIONS = {
    "mid": "middle",
    "sup": "superior",
    "inf": "inferior",
    "med": "medial",
    "ant": "anterior",
    "post": "posterior",
    "orb": "orbital",
    "oper": "opercular",
    "tri": "triangular",
}


def plain_name(name: str) -> str:
    """A dataset.json class name as words: ``left_kidney`` -> ``left kidney``; an abbreviated side at either end and
    common atlas abbreviations spelt out, the side first: ``Frontal_Mid_L`` -> ``left frontal middle``."""
    words = re.sub(r"\s+", " ", name.replace("_", " ").replace("-", " ")).strip().lower().split(" ")
    if len(words) > 1 and words[-1] in {*SIDES, "left", "right"}:
        words = [SIDES.get(words[-1], words[-1]), *words[:-1]]
    elif len(words) > 1 and words[0] in SIDES:
        words[0] = SIDES[words[0]]
    if len(words) > 1:
        words = [ABBREVIATIONS.get(word, word) for word in words]
    return " ".join(words)


def synonyms(name: str) -> list[str]:
    """The name and its rewrites: each known word group swapped for its synonyms, laterality moved to the end."""
    base = plain_name(name)
    variants = [base]
    for key, options in SYNONYMS.items():
        if re.search(rf"\b{re.escape(key)}\b", base):
            variants += [re.sub(rf"\b{re.escape(key)}\b", option, base) for option in options]
            break
    side = re.match(r"^(left|right) (.+)$", base)
    if side:
        variants += [f"{side.group(2)} on the {side.group(1)} side", f"{side.group(1)}-sided {side.group(2)}"]
    return list(dict.fromkeys(variants))


def modality_word(modality: str) -> str:
    for key, word in MODALITY_WORDS.items():
        if key.lower() in modality.lower():
            return word
    return "medical"


def modality_from_preset(preset: str) -> str:
    """A modality word for a preprocessing preset, when dataset.json's modality is not at hand."""
    return "CT" if preset.startswith("ct") else "MRI" if preset == "mr" else "medical"


def class_phrases(name: str, modality: str) -> tuple[list[str], list[str]]:
    """(training phrases, held-out phrases) for one class name."""
    words, m = synonyms(name), modality_word(modality)
    train = [t.format(x=w, m=m) for w in words for t in TRAIN_TEMPLATES]
    heldout = [t.format(x=words[0], m=m) for t in HELDOUT_TEMPLATES]
    return list(dict.fromkeys(train)), heldout


def _group(targets: Sequence[int], names: Sequence[str], modality: str) -> TextTarget:
    train, heldout = [], []
    for name in names:
        more, held = class_phrases(name, modality)
        train += more
        heldout += held
    return TextTarget(tuple(targets), " + ".join(names), list(dict.fromkeys(train)), heldout[:1])


def _common_suffix(names: Sequence[str]) -> str:
    split = [n.split() for n in names]
    common: list[str] = []
    for words in zip(*(reversed(s) for s in split), strict=False):
        if len(set(words)) > 1:
            break
        common.insert(0, words[0])
    return " ".join(common)


def generated_groups(classes: dict[int, str], modality: str) -> list[TextTarget]:
    """Multi-class targets from the names: every pair when there are 2 or 3 classes ("a and b"), all classes at
    once, the classes of one side ("left ..."), and left / right pairs of one structure ("both kidneys")."""
    names = {c: plain_name(n) for c, n in classes.items()}
    groups = []
    ids = sorted(names)
    if 2 <= len(ids) <= 3:
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                groups.append(_group((a, b), [f"{names[a]} and {names[b]}"], modality))
    if len(ids) >= 2:
        suffix = _common_suffix(list(names.values()))
        words = [f"all {suffix}", f"every {suffix} region"] if suffix else []
        words += ["all labelled structures", "every annotated structure"]
        groups.append(_group(ids, words, modality))
    for side in ("left", "right"):
        mine = [c for c in ids if names[c].startswith(f"{side} ")]
        if 1 < len(mine) < len(ids):
            suffix = _common_suffix([names[c] for c in mine])
            if suffix:
                groups.append(_group(mine, [f"{side} {suffix}"], modality))
    stems: dict[str, list[int]] = {}
    for c in ids:
        side = re.match(r"^(left|right) (.+)$", names[c])
        if side:
            stems.setdefault(side.group(2), []).append(c)
    for stem, members in stems.items():
        if len(members) == 2:
            groups.append(_group(members, [f"left and right {stem}", f"both sides of the {stem}"], modality))
    # keep one group per class set (the first wording found)
    unique: dict[tuple[int, ...], TextTarget] = {}
    for group in groups:
        unique.setdefault(group.targets, group)
    return list(unique.values())


def class_for_phrase(text_manifest: dict | None, phrase: str, default: int) -> int:
    """The class a phrase names in a run's phrase book (one of its phrases, or a class name), else ``default``."""
    if not text_manifest:
        return default
    wanted = plain_name(phrase)
    for entry in PhraseBook.from_dict(text_manifest).single.values():
        if wanted in {plain_name(p) for p in [entry.name, *entry.train, *entry.heldout]}:
            return entry.targets[0]
    return default


def build_phrase_book(
    classes: dict[int, str], modality: str = "MRI", phrase_file: str | Path | None = None
) -> PhraseBook:
    """The phrase book of a run: generated for every class of ``classes`` (id -> dataset.json name), with the
    user's phrases from ``phrase_file`` replacing or adding to them."""
    entries = []
    for class_id, name in sorted(classes.items()):
        train, heldout = class_phrases(name, modality)
        entries.append(TextTarget((class_id,), name, train, heldout))
    entries += generated_groups(classes, modality)
    if phrase_file:
        entries = _apply_phrase_file(entries, classes, Path(phrase_file))
    held_everywhere = {p for e in entries for p in e.heldout}
    seen = set()
    for entry in entries:
        # a phrase naming two different targets would contradict itself in training; keep its first target
        entry.train = [p for p in entry.train if p not in seen and p not in held_everywhere]
        seen.update(entry.train)
        if not entry.train:
            raise PhraseFileError(f"no training phrase is left for {entry.name!r} (all are used by other targets)")
    return PhraseBook(entries)


def _class_id(key, classes: dict[int, str], path: Path) -> int:
    if (isinstance(key, int) or (isinstance(key, str) and key.isdigit())) and int(key) in classes:
        return int(key)
    by_name = {plain_name(n): c for c, n in classes.items()}
    if isinstance(key, str) and plain_name(key) in by_name:
        return by_name[plain_name(key)]
    known = ", ".join(f"{c} ({n})" for c, n in sorted(classes.items()))
    raise PhraseFileError(f"{path}: {key!r} is not a class of this run; known: {known}")


def _phrase_list(value, where: str, path: Path) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise PhraseFileError(f"{path}: {where} must be a non-empty list of phrases, got {value!r}")
    return [v.strip() for v in value]


def _apply_phrase_file(entries: list[TextTarget], classes: dict[int, str], path: Path) -> list[TextTarget]:
    if not path.is_file():
        raise PhraseFileError(f"{path}: phrase file not found (prompt.phrases)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PhraseFileError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict) or set(data) - {"classes", "heldout", "groups"}:
        raise PhraseFileError(f"{path}: expected a mapping with keys classes, heldout, groups; got {data!r:.200}")
    single = {e.targets[0]: e for e in entries if len(e.targets) == 1}
    for key, value in (data.get("classes") or {}).items():
        single[_class_id(key, classes, path)].train = _phrase_list(value, f"classes.{key}", path)
    for key, value in (data.get("heldout") or {}).items():
        single[_class_id(key, classes, path)].heldout = _phrase_list(value, f"heldout.{key}", path)
    groups = [e for e in entries if len(e.targets) > 1]
    for k, group in enumerate(data.get("groups") or []):
        if not isinstance(group, dict) or set(group) != {"classes", "phrases"}:
            raise PhraseFileError(f"{path}: groups[{k}] needs exactly the keys classes and phrases")
        targets = tuple(sorted({_class_id(c, classes, path) for c in group["classes"]}))
        if len(targets) < 2:
            raise PhraseFileError(f"{path}: groups[{k}] must name at least two classes")
        phrases = _phrase_list(group["phrases"], f"groups[{k}].phrases", path)
        groups = [g for g in groups if g.targets != targets]
        groups.append(TextTarget(targets, " + ".join(classes[c] for c in targets), phrases, []))
    for entry in single.values():  # user phrases may reuse a generated held-out one: it stays out of evaluation
        entry.heldout = [p for p in entry.heldout if p not in entry.train]
    return [*single.values(), *groups]
