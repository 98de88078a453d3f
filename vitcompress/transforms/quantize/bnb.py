"""bitsandbytes as the comparison point users know: LLM.int8 (vector-wise int8 with fp16 outlier columns) and
NF4 (4-bit NormalFloat weights, blockwise absmax, double-quantized statistics).

Both are bitsandbytes' own modules, subclassed only so that an artifact reloads: bitsandbytes quantizes on
``.to(device)`` and does not read its own NF4 state dict back (transformers does that in its loader).
bitsandbytes is imported lazily: the rest of vitcompress works without it.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
from torch import nn

from ...errors import ConfigError

BNB_KINDS = ("int8", "nf4")
QUANT_STATE_BYTES = 512


@cache
def _classes() -> tuple[type[nn.Module], type[nn.Module]]:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns about optional kernels
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - any import failure means the backend is unavailable
        raise ConfigError(f"--backend bnb needs bitsandbytes, which failed to import: {e}") from None

    class BnbInt8Linear(bnb.nn.Linear8bitLt):
        """LLM.int8: x [..., in] -> [..., out]. State: weight int8 [out, in], SCB [out] (row absmax), bias."""

        _vc_compressed = True

    class BnbNf4Linear(bnb.nn.Linear4bit):
        """NF4 weights, compute in ``compute_dtype``. State: packed weight uint8 and its quant-state tensors."""

        _vc_compressed = True

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            for key in [k for k in destination if k.startswith(prefix + "weight.quant_state.")]:
                destination[key] = _pad_json(destination[key])  # JSON bytes; fixed length for strict loading

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            key = prefix + "weight"
            stats = {k[len(key) + 1:]: state_dict[k] for k in list(state_dict) if k.startswith(key + ".")}
            loaded = key in state_dict and bool(stats)
            if loaded:
                device = self.weight.device
                self.weight = bnb.nn.Params4bit.from_prequantized(state_dict[key], stats, device=device, module=self)
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith(key)}
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if loaded:  # read above, so not missing
                missing_keys[:] = [k for k in missing_keys if k != key]

    return BnbInt8Linear, BnbNf4Linear


def _pad_json(blob: torch.Tensor, size: int = QUANT_STATE_BYTES) -> torch.Tensor:
    """bitsandbytes packs NF4's non-tensor quant state as JSON in a uint8 tensor whose length varies; pad it
    with spaces (valid JSON whitespace) to ``size`` bytes so that artifacts load with strict shape checks."""
    if blob.numel() > size:
        raise ValueError(f"bitsandbytes quant state is {blob.numel()} bytes, more than {size}")
    return torch.cat([blob, blob.new_full((size - blob.numel(),), ord(" "))])


def to_bnb(linear: nn.Linear, kind: str, blocksize: int = 64, threshold: float = 6.0) -> nn.Module:
    """``linear`` as a bitsandbytes layer (``kind`` int8 or nf4, NF4 blocks of ``blocksize``) on its device.

    Both load an artifact's state dict afterwards (an artifact restore quantizes the fresh weights first).
    """
    int8_cls, nf4_cls = _classes()  # a one-line error where bitsandbytes does not import
    import bitsandbytes as bnb

    device = linear.weight.device
    w, b = linear.weight.detach().float().clone(), None if linear.bias is None else linear.bias.detach().float()
    if kind == "int8":
        mod = int8_cls(linear.in_features, linear.out_features, b is not None, has_fp16_weights=False,
                       threshold=threshold, device="meta")
        mod.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    elif kind == "nf4":
        mod = nf4_cls(linear.in_features, linear.out_features, b is not None, compute_dtype=torch.bfloat16,
                      quant_type="nf4", device="meta")
        mod.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=blocksize,
                                       compress_statistics=True)
    else:
        raise ConfigError(f"bitsandbytes kind must be one of {', '.join(BNB_KINDS)}, got '{kind}'")
    if b is not None:
        mod.bias = nn.Parameter(b.clone(), requires_grad=False)
    return mod.to(device)  # bitsandbytes quantizes here
