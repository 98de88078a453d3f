"""Eventful Transformers (Dutson et al., ICCV 2023): a ViT that re-processes, frame after frame of a video, only
the tokens that changed. ``ops``: the gate policies as pure tensor functions; ``transform``: config and timm glue."""
