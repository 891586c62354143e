"""Coded concepts used in the objects pacs-xai writes.

All from the DICOM Content Mapping Resource (coding scheme DCM) unless stated.
"""

import hashlib as _hashlib
import re as _re

from pydicom.sr.coding import Code

from dicom_io.vr import LO_MAX, SH_MAX

#: Purpose of Reference for SourceImageSequence items: "Source image for image processing operation".
PURPOSE_SOURCE_IMAGE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")

#: Visual explanation quantities (DICOM CP-2141): which one fits a method is chosen per family.
CLASS_ACTIVATION = Code("130402", "DCM", "Class activation")
GRADIENT_WEIGHTED_CLASS_ACTIVATION = Code("130403", "DCM", "Gradient-weighted class activation")
SALIENCY = Code("130404", "DCM", "Saliency")

#: Purpose of Reference for the ContributingEquipmentSequence item that describes the model
#: (CID 7005 "Contributing Equipment Purpose of Reference"). PS3.16 defines 109102 as "equipment
#: that has processed composite instances to create new composite instances"; every pacs-xai
#: output is a new instance derived from a source image, so this is the fitting code. 109103
#: "Modifying Equipment" is for equipment that changed an existing instance *without* creating a
#: new one. IHE AI Results (Rev. 1.1) asks for (Newcode1, 99IHE, "Processing Algorithm"), a
#: placeholder code that no DICOM edition defines and that is outside CID 7005 (highdicom refuses
#: it); the AIR attributes themselves (Manufacturer, Manufacturer's Model Name = model name,
#: Software Versions, Device UID) are all written.
PURPOSE_PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

#: Derivation Code Sequence (CID 7203 "Image Derivation") is deliberately not written: none of its
#: codes (MPR, MIP, pixel-by-pixel arithmetic, segmentation, smoothing, ...) describes an
#: attribution/saliency overlay, and inventing one is worse than leaving the Type 3 attribute out.
#: DerivationDescription carries the method, class, model name and version in text instead.

# --------------------------------------------------------------------------------------------
# Parametric Map, Segmentation and SR (TID 1500) outputs
# --------------------------------------------------------------------------------------------

#: Concept name of CID 217 "Visual Explanation" (the group the three codes above belong to).
#: Used as the Segmented Property Category of attribution segments and as the concept name of
#: the SR qualitative evaluation whose value says which kind of map the explanation is.
VISUAL_EXPLANATION = Code("130401", "DCM", "Visual explanation")

#: Algorithm Family (CID 7162) of the classifier that produced the finding and the map.
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

#: Units of the raw attribution values in the Parametric Map (CID 7181). An attribution map
#: keeps the explainer's raw scale (gradients, activations, score differences...), which has no
#: physical unit and differs between methods, so UCUM "arbitrary unit" is the honest choice;
#: "1" (no units) would claim a dimensionless ratio.
ATTRIBUTION_UNIT = Code("[arb'U]", "UCUM", "arbitrary unit")

#: Unit of a probability in [0, 1] (CID 7181 "no units").
PROBABILITY_UNIT = Code("1", "UCUM", "no units")

#: Concept name of the numeric SR measurement that holds the model's probability of the finding.
PROBABILITY = Code("122157", "DCM", "Probability")

#: Concept name of the SR IMAGE items that point at the Secondary Capture, Parametric Map and
#: Segmentation made for the finding: pictures that illustrate it, not sources of a measurement.
ILLUSTRATION_OF_FINDING = Code("125201", "DCM", "Illustration of Finding")

#: Coding scheme of the class names no standard terminology codes (SR finding codes).
PRIVATE_SCHEME = "99PACSXAI"
PRIVATE_SCHEME_NAME = "pacs-xai classifier classes and trust signals"

# --------------------------------------------------------------------------------------------
# Trust signals in the SR (service.trust): whether the explanation and the input can be believed
# --------------------------------------------------------------------------------------------
# No DCM or SCT concept names an attribution share outside the anatomy, a shortcut suspicion or an
# out-of-distribution input (the DCM quality codes, 111050 "Quality Assessment" and the like, rate
# image acquisition), so these concept names are in the private scheme. Their code values are in
# upper case, so they never collide with the lower-case class codes of :func:`finding_code`. The
# values of the yes/no evaluations are SNOMED CT's (CID 230 "Yes-No").

#: Numeric measurement: the share of the positive attribution inside the region outside the
#: anatomy (edge band, background, burned-in text, shutter), in percent.
ATTRIBUTION_OUTSIDE_ANATOMY = Code("TRUST-OUTSIDE", PRIVATE_SCHEME, "Attribution outside anatomy")
#: Numeric measurement: that share divided by the area fraction of the region (no units).
ATTRIBUTION_OUTSIDE_CONCENTRATION = Code("TRUST-CONC", PRIVATE_SCHEME, "Attribution concentration outside anatomy")
#: Qualitative evaluation, Yes / No: share and concentration reach the model card's thresholds.
EXPLANATION_SHORTCUT_SUSPECTED = Code("TRUST-SHORTCUT", PRIVATE_SCHEME, "Explanation shortcut suspected")
#: Qualitative evaluation, Yes / No: the input's feature distance exceeds the calibrated threshold.
INPUT_OUT_OF_DISTRIBUTION = Code("TRUST-OOD", PRIVATE_SCHEME, "Input out of distribution")
#: Numeric measurement: Mahalanobis distance of the pooled features to the nearest class mean (no units).
FEATURE_DISTANCE = Code("TRUST-OOD-DIST", PRIVATE_SCHEME, "Feature Mahalanobis distance")
#: Values of the yes/no evaluations (CID 230).
#: A multi-label model's finding at or above its threshold is Present, below it Absent (the SR).
PRESENCE_OF_PROPERTY = Code("121052", "DCM", "Presence of property")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")
#: Unit of a share in percent (CID 7181, UCUM).
PERCENT_UNIT = Code("%", "UCUM", "percent")
#: Unit of a dimensionless ratio or distance (CID 7181 "no units").
NO_UNITS = Code("1", "UCUM", "no units")

_CLASS_ACTIVATION_METHODS = frozenset({"cam", "scorecam", "ablationcam", "eigencam"})
_GRADIENT_WEIGHTED_METHODS = frozenset(
    {"gradcam", "gradcampp", "gradcamplusplus", "guidedgradcam", "xgradcam", "hirescam", "layercam"}
)


def _method_key(method: str) -> str:
    """Registry name reduced to lower-case letters and digits: "Grad-CAM++" -> "gradcampp"."""
    return _re.sub(r"[^a-z0-9]", "", method.lower().replace("+", "p"))


def quantity_code(method: str) -> Code:
    """The DCM code (CID 217 "Visual Explanation") of the quantity an explainer's map holds.

    How the method is mapped (the registry name is compared without case, "-", "_" or spaces;
    "+" counts as "p", so "gradcam_pp", "Grad-CAM++" and "gradcampp" are the same method):

    - (130403, DCM, "Gradient-weighted class activation"): a layer's activation maps weighted
      per channel by the class score's *gradients* — gradcam, gradcam_pp (Grad-CAM++),
      guided_gradcam, xgradcam, hirescam, layercam.
    - (130402, DCM, "Class activation"): a layer's activation maps weighted *without*
      gradients — cam (weights of the classifier layer), scorecam (forward-pass scores),
      ablationcam, eigencam.
    - (130404, DCM, "Saliency"): everything else — input gradients (vanilla, input x
      gradient, integrated gradients, SmoothGrad, guided backprop, deconvnet), propagation
      (DeepLIFT, LRP), perturbation (occlusion, RISE, HiPe), surrogates (LIME, KernelSHAP),
      optimisation methods: a per-pixel importance of the input for the class.
    """
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    key = _method_key(method)
    if key in _GRADIENT_WEIGHTED_METHODS:
        return GRADIENT_WEIGHTED_CLASS_ACTIVATION
    if key in _CLASS_ACTIVATION_METHODS:
        return CLASS_ACTIVATION
    return SALIENCY


#: SNOMED CT concepts for the class names that have one (keys compared like method names).
_FINDING_CODES = {
    "nodule": Code("27925004", "SCT", "Nodule"),
    "effusion": Code("60046008", "SCT", "Pleural effusion"),
    "pleuraleffusion": Code("60046008", "SCT", "Pleural effusion"),
    "normal": Code("17621005", "SCT", "Normal"),
}


def finding_code(class_name: str) -> Code:
    """Coded finding for a classifier class name (the SR's Finding).

    "nodule" -> (27925004, SCT, "Nodule"); "effusion" / "pleural effusion" -> (60046008, SCT,
    "Pleural effusion") (the demo model's effusion class is a pleural effusion on a chest
    radiograph); "normal" -> (17621005, SCT, "Normal"). Any other class gets a code in the
    private scheme :data:`PRIVATE_SCHEME`: the class name in lower case with runs of other
    characters as "-" (at most 16 characters, DICOM SH; longer names keep 7 characters plus a
    hash), meaning = the class name.
    """
    if not isinstance(class_name, str) or not class_name.strip():
        raise ValueError(f"class_name must be a non-empty string, got {class_name!r}")
    known = _FINDING_CODES.get(_method_key(class_name))
    if known is not None:
        return known
    slug = _re.sub(r"[^a-z0-9]+", "-", class_name.strip().lower()).strip("-") or "class"
    if len(slug) > SH_MAX:
        slug = f"{slug[:7]}-{_hashlib.sha256(class_name.encode()).hexdigest()[:8]}"
    return Code(slug, PRIVATE_SCHEME, class_name.strip()[:LO_MAX])


#: Procedure Reported (CID 100) per source modality; other modalities get SCT "Imaging procedure".
_PROCEDURE_CODES = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
    "CR": Code("43468-8", "LN", "XR unspecified body region"),
    "DX": Code("43468-8", "LN", "XR unspecified body region"),
}
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")


def procedure_code(modality: str | None) -> Code:
    """Procedure Reported (CID 100) of the SR for the source's Modality."""
    return _PROCEDURE_CODES.get(str(modality or "").upper(), IMAGING_PROCEDURE)
