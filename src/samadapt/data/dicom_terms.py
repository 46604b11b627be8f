"""The words of DICOM outputs: SNOMED CT codes for class names (``coded_terms``) and what made the labels
(``Algorithm``). Shared by the Segmentation writer (``dicom_out``) and the RT Structure Set writer (``rtstruct``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from samadapt import __version__

ANATOMY = codes.SCT.AnatomicalStructure
ALTERED = codes.SCT.MorphologicallyAbnormalStructure
TISSUE = codes.SCT.Tissue
# class name (lower case, words only) -> (category, type); laterality words are read apart (``coded_terms``)
TERMS: dict[str, tuple[Code, Code]] = {
    "liver": (ANATOMY, codes.SCT.Liver),
    "spleen": (ANATOMY, codes.SCT.Spleen),
    "kidney": (ANATOMY, codes.SCT.Kidney),
    "aorta": (ANATOMY, codes.SCT.Aorta),
    "gallbladder": (ANATOMY, codes.SCT.Gallbladder),
    "gall bladder": (ANATOMY, codes.SCT.Gallbladder),
    "pancreas": (ANATOMY, codes.SCT.Pancreas),
    "stomach": (ANATOMY, codes.SCT.Stomach),
    "duodenum": (ANATOMY, codes.SCT.Duodenum),
    "adrenal gland": (ANATOMY, codes.SCT.AdrenalGland),
    "inferior vena cava": (ANATOMY, codes.SCT.InferiorVenaCava),
    "portal vein": (ANATOMY, codes.SCT.PortalVein),
    "bladder": (ANATOMY, codes.SCT.Bladder),
    "prostate": (ANATOMY, codes.SCT.Prostate),
    "rectum": (ANATOMY, codes.SCT.Rectum),
    "colon": (ANATOMY, codes.SCT.Colon),
    "heart": (ANATOMY, codes.SCT.Heart),
    "lung": (ANATOMY, codes.SCT.Lung),
    "brain": (ANATOMY, codes.SCT.Brain),
    "brainstem": (ANATOMY, codes.SCT.BrainStem),
    "brain stem": (ANATOMY, codes.SCT.BrainStem),
    "spinal cord": (ANATOMY, codes.SCT.SpinalCord),
    "parotid": (ANATOMY, codes.SCT.ParotidGland),
    "parotid gland": (ANATOMY, codes.SCT.ParotidGland),
    "submandibular gland": (ANATOMY, codes.SCT.SubmandibularGland),
    "esophagus": (ANATOMY, codes.SCT.Esophagus),
    "oesophagus": (ANATOMY, codes.SCT.Esophagus),
    "larynx": (ANATOMY, codes.SCT.Larynx),
    "trachea": (ANATOMY, codes.SCT.Trachea),
    "mandible": (ANATOMY, codes.SCT.Mandible),
    "oral cavity": (ANATOMY, codes.SCT.OralCavity),
    "optic nerve": (ANATOMY, codes.SCT.OpticNerve),
    "optic chiasm": (ANATOMY, codes.SCT.OpticChiasm),
    "eye": (ANATOMY, codes.SCT.Eye),
    "lens": (ANATOMY, codes.SCT.Lens),
    "femur": (ANATOMY, codes.SCT.Femur),
    "tumour": (ALTERED, codes.SCT.Neoplasm),
    "tumor": (ALTERED, codes.SCT.Neoplasm),
    "whole tumour": (ALTERED, codes.SCT.Neoplasm),
    "whole tumor": (ALTERED, codes.SCT.Neoplasm),
    "enhancing tumour": (ALTERED, codes.SCT.Neoplasm),
    "non enhancing tumour": (ALTERED, codes.SCT.Neoplasm),
    "neoplasm": (ALTERED, codes.SCT.Neoplasm),
    "lesion": (ALTERED, codes.SCT.Lesion),
    "edema": (ALTERED, codes.SCT.Edema),
    "oedema": (ALTERED, codes.SCT.Edema),
    "necrosis": (ALTERED, codes.SCT.Necrosis),
}
LATERALITY = {"left": codes.SCT.Left, "l": codes.SCT.Left, "right": codes.SCT.Right, "r": codes.SCT.Right}


def coded_terms(name: str) -> tuple[Code, Code, Code | None]:
    """(category, type, laterality or None) for a class name: ``"left kidney"``, ``"Kidney_L"`` and
    ``"kidney left"`` all give (Anatomical Structure, Kidney, Left); an unknown name gives (Tissue, Tissue, None)."""
    words = re.sub(r"[^a-z0-9]+", " ", name.lower()).split()
    side = next((LATERALITY[w] for w in words if w in LATERALITY), None)
    rest = " ".join(w for w in words if w not in LATERALITY)
    if rest in TERMS:
        return (*TERMS[rest], side)
    return TISSUE, TISSUE, None


@dataclass(frozen=True)
class Algorithm:
    """What made the labels: samadapt's version, the run (or model) name and a SHA-256 of its weights: the
    adapter's for a run directory (``checksum_of`` "adapter"), else the model's or the ONNX encoder's."""

    run: str = ""
    checksum: str = ""
    checksum_of: str = "adapter"
    generation: str = "AUTOMATIC"  # SEMIAUTOMATIC for labels a person prompted and edited (the app)
    name: str = "samadapt"
    version: str = __version__

    def describe(self) -> str:
        checksum = f" {self.checksum_of} sha256 {self.checksum}" if self.checksum else ""
        return f"{self.name} {self.version} run {self.run or '-'}{checksum}"

    def parameters(self) -> dict[str, str]:
        return {"run": self.run or "-", f"{self.checksum_of.replace(' ', '_')}_sha256": self.checksum or "-"}
