"""D-REX-style augmentation: noise ladders, policy zoo, ranking reward, video augmentation, datasets.

Installed as ``improver.augment``.
"""
