"""Data: record sources (image folders, Stanford Cars devkit, TFDS), Grain pipelines,
the seed's augmentation, and the generated demo set."""
