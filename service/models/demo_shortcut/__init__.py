"""A demo model that CHEATS, on purpose (``pacs-xai demo train --shortcut``): the demo network
trained by the same recipe on phantoms whose nodule images all carry the burned-in word
"PORTABLE". It is the test bed of the shortcut signal and of ``pacs-xai evaluate``; never deploy it.
Its card (``model.yaml``) records the held-out accuracy with the token as in training and with the
token moved to the other classes."""
