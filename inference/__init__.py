"""The torch-free pipeline from an image to its instances, shared by every entry point.

``model`` <- ``export`` <- ``inference`` <- {``training``, ``service``}: evaluation, the service, the predict
CLI and the benchmarks all segment through this package (``docs/architecture.md``), so what is measured is
what users get. Modules: ``decode`` (guarded decoding by the input contract), ``sizing`` (input size, shape
buckets, padding), ``tiling`` (tiles and their merge), ``scale`` (``scale=auto``), ``runtime`` (one factory,
``open_runtime``, and its options), ``streams`` (parallel onnxruntime sessions), ``pipeline`` (the steps and
their synchronous driver), ``predictor`` (``Predictor``), ``errors`` (what the pipeline refuses).
"""
