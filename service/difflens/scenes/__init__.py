"""Synthetic scenes with known ground truth: the renderer, the caption grammar and an attribute checker.

The shapes model (training/shapes.py) is trained on these scenes, and the faithfulness metrics use their masks.
Pure numpy; nothing here imports torch.
"""
