"""pacs-xai's service, in the order of the data flow: ``node`` (receive, assemble, process, send),
``inference`` (model card, runners, pool), ``explain`` (the saliency methods), ``synthetic``
(phantoms), ``models`` (the demo model as package data); ``cli`` and ``tools`` (demo, benches,
viewer stack) sit on top and import the rest, never the reverse. docs/architecture.md has the map.
"""

__version__ = "0.1.0"
