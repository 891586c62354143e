"""Maximum value lengths, in characters, of the DICOM value representations pacs-xai writes or checks.

PS3.5 6.2 (Table 6.2-1). Text longer than its limit is cut (descriptions) or refused (names that
must stay whole), never written too long.
"""

from __future__ import annotations

__all__ = ["AE_MAX", "LO_MAX", "SH_MAX", "ST_MAX"]

#: Application Entity (AE): an AE title, leading and trailing spaces not significant.
AE_MAX = 16
#: Short String (SH): e.g. Code Value, LUT Label.
SH_MAX = 16
#: Long String (LO): e.g. Series Description, Manufacturer's Model Name, Software Versions, Code Meaning.
LO_MAX = 64
#: Short Text (ST): e.g. Derivation Description, Contribution Description, Segment Description.
ST_MAX = 1024
