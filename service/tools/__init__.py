"""Tools around the product: the demo, the benchmarks, the viewer stack, the Orthanc launcher and
DCMTK resolution. They import the product (``service.node``, ``service.explain``, ...); the product
never imports them."""
