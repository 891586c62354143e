"""Coded concepts used in the objects pacs-xai writes.

All from the DICOM Content Mapping Resource (coding scheme DCM) unless stated.
"""

from pydicom.sr.coding import Code

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
