"""Post-training quantization: ``ops`` (pure), ``calib``, ``simulate``, deployable layers, ``transform``."""
