"""Accuracy tables on the digits testbed: each variant's top-1 and agreement with the uncompressed model.

Used by every method's benchmark script. Each variant is a function building a compressed copy of the
base model; every row is measured on the same images (digits test and digits-c), in bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vitcompress import create_model, data_config, model_info
from vitcompress.data import load_data
from vitcompress.evaluate import evaluate
from vitcompress.provenance import run_context
from vitcompress.report import markdown_table

SPECS = ("digits", "digits-c")


def accuracy_table(artifact: str, variants: dict[str, Callable[[nn.Module], nn.Module]],
                   details: Callable[[nn.Module], str] = lambda m: "",
                   keep: dict[str, nn.Module] | None = None) -> dict[str, Any]:
    """Evaluate ``artifact`` and each ``variants[name](base)``; returns rows with top1 / agreement per spec.

    keep: filled with the models evaluated (``uncompressed`` and each variant), for further measurements.
    """

    base = create_model(artifact)
    data = {s: load_data(s, data_config(base)) for s in SPECS}

    def row(name: str, model: nn.Module, base_row: dict[str, Any] | None) -> dict[str, Any]:
        res = {s: evaluate(model, d if model is base else d.for_config(data_config(model)), reference=base,
                           speed=False) for s, d in data.items()}
        out = {"variant": name, "details": details(model) if model is not base else "",
               "transforms": [t["config"] for t in model_info(model).transforms],
               "gflops": res["digits"]["gflops"], "size_mb": round(res["digits"]["size_mb"], 3),
               **{f"{s}_{k}": r[k] for s, r in res.items() for k in ("top1", "agreement", "kl")}}
        out["gflops_fraction"] = round(out["gflops"] / (base_row or out)["gflops"], 3)
        print(f"{name:30s} GFLOPs {out['gflops_fraction']:.3f}  digits top1 {out['digits_top1']:.2f}  "
              f"digits-c agreement {out['digits-c_agreement']:.2f}", flush=True)
        return out

    keep = {} if keep is None else keep
    keep["uncompressed"] = base
    rows = [row("uncompressed", base, None)]
    for name, build in variants.items():
        keep[name] = build(base)
        rows.append(row(name, keep[name], rows[0]))
    return {"artifact": artifact, "images": {s: len(d) for s, d in data.items()}, "dtype": "bf16",
            **run_context(), "rows": rows}


def accuracy_markdown(res: dict[str, Any], title: str, details_header: str, note: str = "") -> str:
    base = res["rows"][0]
    lines = [f"# {title}", "",
             f"Artifact trained by `recipes/digits_vit.yaml`; digits test ({res['images']['digits']} images) and "
             f"digits-c ({res['images']['digits-c']} images); bf16 autocast; torch {res['versions']['torch']}, "
             f"timm {res['versions']['timm']}; {res['date']}. Agreement: top-1 equal to the uncompressed model's "
             "on the same image. GFLOPs: counted by torch.utils.flop_counter, attention included." + note, "",
             markdown_table(["variant", details_header, "GFLOPs", "size MiB", "top-1", "Δ top-1", "agreement",
                             "digits-c top-1", "**digits-c agreement**"],
                            [[r["variant"], r["details"] or None, f"{r['gflops_fraction']:.3f}", r["size_mb"],
                              r["digits_top1"], f"{r['digits_top1'] - base['digits_top1']:+.2f}", r["digits_agreement"],
                              r["digits-c_top1"], f"**{r['digits-c_agreement']:.2f}**"] for r in res["rows"]],
                            align="llrrrrrrr")]
    return "\n".join(lines) + "\n"
