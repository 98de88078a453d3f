"""The ``vitcompress`` console script. ``vitcompress``, ``--help`` and ``--version`` answer from this module alone,
without torch, timm or the pipeline (a first look, and every shell completion's start, should not cost seconds);
everything else loads :mod:`vitcompress.cli`. ``tests/test_cli.py`` checks :data:`COMMANDS` against the real app."""

from __future__ import annotations

import os
import sys
import textwrap

from ._version import __version__

SUMMARY = "Compress pretrained Vision Transformers and measure what each step costs."

# (command, the first paragraph of its help), in the app's order
COMMANDS: tuple[tuple[str, str], ...] = (
    ('list',
     'Every method: its family, whether it runs deployed (not only simulated), and the command that '
     'applies it.'),
    ('info',
     'What an artifact or an exported file holds: the base, each transform with its config and solved '
     'state, size, recorded metrics, provenance and whether its weights match their recorded checksum.'),
    ('merge',
     'Token merging (ToMe) or pruning (EViT), training-free; writes an artifact.'),
    ('adapt',
     'Adaptive token counts per image (ATS-style), training-free; writes an artifact.'),
    ('sparse-attn',
     'Training-free block-sparse attention (Sparsifiner-style); writes an artifact.'),
    ('learn-merge',
     'Learned token merging under a FLOPs budget (LTMP / DiffRate-style), backbone frozen; writes an '
     'artifact.'),
    ('eventful',
     'Eventful Transformers: a stateful model for video that re-processes only the tokens that changed '
     'since the last frame, training-free; writes an artifact (evaluate it on a video: data spec).'),
    ('train',
     'Train or fine-tune a classifier from a recipe and save it as an artifact.'),
    ('eval',
     'Accuracy, agreement with a reference, latency, memory, size and GFLOPs of MODEL on --data.'),
    ('prune',
     'Structured (heads, MLP width), block-structured pruning and MiniViT weight sharing, with optional '
     'distillation recovery.'),
    ('quantize',
     'Post-training quantization: simulated W2-8/A2-8, or deployed (int8/fp8 W8A8, weight-only int8/int4, '
     'bnb); with --mean-bits, mixed precision (a simulated width per layer from calibration '
     'sensitivities).'),
    ('export',
     'Export MODEL (timm id, checkpoint or artifact, any stack) to ONNX or a torch.export program.'),
    ('sweep',
     'Measure compression stacks on one base model; resumable; writes the Pareto report.'),
    ('search',
     'The fastest stack deployable on --target whose held-out drop stays within --max-drop (needs Optuna).'),
    ('report',
     'Pareto fronts, report.md, pareto.png, points.csv and pareto.json from a sweep directory.'),
    ('demo',
     'The main job: train (or reuse) the digits baseline, sweep every method alone and stacked, report.'),
)

OPTIONS: tuple[tuple[str, str], ...] = (
    ("--version", "Print the version and exit."),
    ("--install-completion", "Install completion for the current shell."),
    ("--show-completion", "Show completion for the current shell, to copy it or customize the installation."),
    ("--help", "Show this message and exit."),
)


def top_help(width: int = 100) -> str:
    """The top-level help: usage, the commands and the options (plain text, at a fixed width)."""
    def table(rows: tuple[tuple[str, str], ...]) -> list[str]:
        pad = max(len(n) for n, _ in rows) + 2
        out = []
        for name, text in rows:
            lines = textwrap.wrap(text, width - pad - 2) or [""]
            out += [f"  {name:<{pad}}{lines[0]}", *(" " * (pad + 2) + ln for ln in lines[1:])]
        return out
    return "\n".join(["Usage: vitcompress [OPTIONS] COMMAND [ARGS]...", "", SUMMARY, "", "Options:",
                      *table(OPTIONS), "", "Commands:", *table(COMMANDS), "",
                      "Run 'vitcompress COMMAND --help' for a command's options (each with its default).", ""])


def run() -> None:
    """The console script: the light answers here, every command through :func:`vitcompress.cli.main`."""
    args = sys.argv[1:]
    if "_VITCOMPRESS_COMPLETE" not in os.environ:  # a completion request goes to Typer
        if args in ([], ["--help"], ["-h"]):
            sys.stdout.write(top_help())
            sys.exit(0)
        if args == ["--version"]:
            print(f"vitcompress {__version__}")
            sys.exit(0)
    from .cli import main  # the whole CLI: torch, timm and every command

    sys.exit(main())
