"""MiniViT (Zhang et al., CVPR 2022): weight multiplexing. ``transform``: the config, the timm glue and the
transform; the weight distillation that recovers it is recovery's ``distill: weight`` (``transforms/distill.py``)."""
