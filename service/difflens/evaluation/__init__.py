"""The faithfulness suite (`difflens evaluate MODEL_DIR`, issue 3): prompt fidelity of a shapes model, and how
faithful DF-RISE, DF-CAM and the attention maps are on its generated scenes (docs/faithfulness.md).

ground_truth: where the object is in a generated image; sampling: batched generation and checker fidelity (also
for the early / late schedules of R3); sanity: the weight-randomised UNet; metrics: per-step measurements and
their aggregation; suite: the orchestration; report / plots: markdown, summary.json and PNG charts. The
subcommand is commands/evaluate.py.
"""
