"""ImageNet-22k as WebDataset shards: writing them, streaming them, augmenting them.

Shard format (the contract between the writer, the loader and the synthetic generator):
  * ``OUT/{split}-{index:06d}.tar``, split ``train`` or ``val``; one sample = ``{key}.jpg`` (JPEG bytes)
    + ``{key}.cls`` (class index, ASCII); ``key`` is stable, derived from the source, and has no dot.
  * ``OUT/classes.json``  -- see :mod:`pipeline.data.manifest`.
  * ``OUT/manifest.json`` -- per shard name, samples, bytes, sha256; totals; skipped inputs with reasons.
"""
