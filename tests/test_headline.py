"""The headline benchmark's judgement (benchmarks/headline.py): the best stack within 1 pt, the goals, the table.
Its timing runs on a GPU (the runbook) or the CPU (results/headline/cpu); here it is fed measured-like figures."""

from benchmarks import headline


def _res():
    rows = {
        "ToMe 0.59x (r=13 on ViT-B)": {"by_batch": {"1": {"ms": 1.0, "vs_compiled": 1.2, "vs_eager": 5.0},
                                                    "256": {"ms": 10.0, "vs_compiled": 1.5, "vs_eager": 2.5}}},
        "W8A8 fp8 static": {"by_batch": {"1": {"ms": 2.0, "vs_compiled": 0.9, "vs_eager": 3.1},
                                         "256": {"ms": 12.0, "vs_compiled": 1.1, "vs_eager": 2.2}}},
        "ToMe 0.45x + fp8": {"by_batch": {"1": {"ms": 0.5, "vs_compiled": 2.0, "vs_eager": 9.0},
                                          "256": {"ms": 5.0, "vs_compiled": 2.5, "vs_eager": 5.0}}},
        "broken": {"error": "RuntimeError: no", "by_batch": {}},
    }
    accuracy = {"ToMe 0.59x (r=13 on ViT-B)": {"top1": 72.2, "delta": -0.6, "agreement_c": 92.5},
                "W8A8 fp8 static": {"top1": 72.9, "delta": 0.1, "agreement_c": 97.7},
                "ToMe 0.45x + fp8": {"top1": 70.4, "delta": -2.4, "agreement_c": 85.9}}
    return {"arch": "vit_base_patch16_224", "device": "test", "date": "today", "versions": {}, "dtype": "bf16",
            "dense_compile_mode": "max-autotune", "command": "python -m benchmarks.headline", "batch_sizes": [1, 256],
            "accuracy_source": "x", "accuracy": accuracy, "rows": rows,
            "dense": {"1": {"eager_ms": 5.0, "compiled_ms": 1.2, "compiled_vs_eager": 4.2},
                      "256": {"eager_ms": 25.0, "compiled_ms": 15.0, "compiled_vs_eager": 1.67}}}


def test_the_best_stack_is_chosen_within_one_point_only():
    name, _ = headline.best_stack(_res(), "256")
    assert name == "ToMe 0.59x (r=13 on ViT-B)"  # the faster 0.45x stack loses 2.4 pt


def test_goals_are_judged_and_slow_methods_listed():
    goals = {g[0]: (g[1], g[2]) for g in headline.goals(_res())}
    assert goals["W8A8 fp8 static >= 1.25x compiled dense at batch 256"] == (1.1, False)
    assert goals["ToMe 0.59x (r=13 on ViT-B) >= 1.4x compiled dense at batch 256"] == (1.5, True)
    best = "best stack within 1 pt (ToMe 0.59x (r=13 on ViT-B))"
    assert goals[f"{best} >= 3.0x eager dense at batch 1"] == (5.0, True)
    assert goals[f"{best} >= 3.0x eager dense at batch 256"] == (2.5, False)
    assert goals[f"{best} >= 1.6x compiled dense at batch 256"] == (1.5, False)


def test_the_table_shows_failures_and_accuracy():
    md = headline.markdown(_res())
    assert "Failed: broken: RuntimeError: no" in md and "72.2" in md and "## Goals (issue #27)" in md


def test_the_recipe_names_every_variant_once():
    names = list(headline.variants())
    assert len(names) == len(set(names)) and headline.GOAL_TOME in names and headline.GOAL_FP8 in names
