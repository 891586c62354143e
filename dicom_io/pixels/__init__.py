"""From a DICOM image to model input, and from a model-grid map back to the source pixel grid.

The chain, per frame (PS3.3 C.11 "Look Up Tables and Presentation States", PS3.4 N.2.1.1), one
module a step:

1. **Decode** (:mod:`.decode`) the stored values (pydicom 3 decoders, one frame at a time),
   after checking the file and its Image Pixel header. Colour data comes back as RGB: pydicom
   converts YBR_FULL / YBR_FULL_422, the JPEG 2000 plugins undo YBR_RCT / YBR_ICT.
2. **Modality LUT** (:mod:`.voi`, grayscale only): Rescale Slope/Intercept or the Modality LUT
   Sequence, giving modality values (for CT: Hounsfield units); enhanced multi-frame objects use
   the Pixel Value Transformation Sequence of their functional groups.
3. **VOI** (:mod:`.voi`, grayscale only): the VOI LUT Sequence, else the first Window
   Center/Width with its VOI LUT Function, else a percentile stretch (always with
   ``InputSpec.windowing == "percentile"``); scaled to [0, 1]. A flat frame gives zeros.
4. **MONOCHROME1** (:mod:`.voi`) is inverted after the VOI so that 1 always means bright as
   displayed.
5. **Colour** (:mod:`.colour`; RGB, YBR_*, PALETTE COLOR through its palette): no modality LUT or
   VOI applies (DICOM defines none for colour); values are scaled to [0, 1] by their bit depth.
   With one model channel they become ITU-R BT.601 luminance (0.299 R + 0.587 G + 0.114 B); with
   three channels RGB is kept. Grayscale sources are replicated when the model wants three.
6. **Geometry** (:mod:`.grid`, :class:`GridMapping`): the [0, 1] frame is resampled (Pillow,
   bilinear, with antialiasing when shrinking) onto the model grid [H, W], ``letterbox``
   (aspect kept, centred, padded with 0) or ``stretch``; :meth:`GridMapping.to_source_grid` is
   its exact inverse, so an attribution map drawn back on the source frame lines up with the
   anatomy.

What the model expects (grid size, channels, aspect, windowing) is an :class:`InputSpec`
(:mod:`.spec`, from the model card); :func:`prepare_frames` (:mod:`.prepare`) runs the whole
chain and gives one :class:`PreparedFrame` per source frame.

The Display Shutter of an image, when it has one, is a mask of the hidden pixels on the source
grid (:func:`shutter_mask`, :mod:`.shutter`).

Normalisation with the model card's mean/std is *not* done here: ``model_input`` is in [0, 1].
This package never imports torch.
"""

from dicom_io.pixels.decode import read_dataset, read_every_element
from dicom_io.pixels.grid import GridMapping
from dicom_io.pixels.prepare import PreparedFrame, prepare_frames
from dicom_io.pixels.shutter import shutter_mask
from dicom_io.pixels.spec import InputSpec
from dicom_io.pixels.voi import window_to_unit

__all__ = [
    "GridMapping",
    "InputSpec",
    "PreparedFrame",
    "prepare_frames",
    "read_dataset",
    "read_every_element",
    "shutter_mask",
    "window_to_unit",
]
