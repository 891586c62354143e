"""All DICOM handling of pacs-xai: pixels in, derived objects out, associations.

This package never imports torch: it speaks numpy arrays and pydicom datasets only.
"""
