"""Images -> tokens -> aligned rows.

- ``toyworld``: procedural images with per-patch ground truth; ``zoo``/``toyzoo``: the backbones (timm models,
  and the toy zoo trained on the toy world);
- ``sources``: where images come from (an image folder, the toy world);
- ``extract``: backbone tokens, standardised (``standardisation``) and written to an activation store
  (``store_writer``) that ``store`` reads back;
- ``online``: the same rows computed on the fly from images, without a store; ``sharding``: a rank's share;
- ``batches``: the one shuffle plan (blocks, windows, carried rows) every row source uses, and
  ``aligned_batches`` over any source.
"""
