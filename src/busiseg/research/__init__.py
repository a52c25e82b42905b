"""Research tooling, not the product: the multi-seed results protocol and its presets, the
evaluate-time ablation, and the normals probe. They measured the recipes the README reports
(docs/results.md); `dvc repro` and `busiseg predict` never import them.

    uv run python -m busiseg.research.protocol show busi-cpu
    uv run python -m busiseg.research.ablate
    uv run python -m busiseg.research.normals
"""
