"""Training batches: freshly rendered scenes and their captions, a pure function of (seed, batch index).

Because batch k depends only on (seed, k), a run resumed from a checkpoint at step k sees exactly the batches an
uninterrupted run would have seen. Rendering a batch of 32 takes ~40 ms against ~1.2 s for a training step on the
2-core machine; there a background rendering thread *slowed* training by 30% (it preempts one of torch's two
OpenMP threads), so batches are rendered in line unless `threaded` is asked for (machines with spare cores).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from difflens.scenes.captions import caption, is_held_out
from difflens.scenes.render import Scene, render_scene, sample_scene


@dataclass(frozen=True)
class DataConfig:
    """What a batch holds. `empty_prob`: share of empty captions (for classifier-free guidance)."""

    size: int = 32
    two_object_prob: float = 0.2
    empty_prob: float = 0.1
    plain_word_prob: float = 0.5  # plain objects: share of captions that say "plain"


@dataclass
class Batch:
    """images: (B, 3, S, S) float32 in [-1, 1]; input_ids: (B, L) int64; captions: B strings ("" = unconditional)."""

    index: int
    images: torch.Tensor
    input_ids: torch.Tensor
    captions: list[str]


def sample_training_scene(rng: np.random.Generator, two_object_prob: float) -> Scene:
    """A random scene whose caption is not held out (rejection sampling; ~20% of draws are rejected)."""
    while True:
        scene = sample_scene(rng, two_object_prob)
        if not is_held_out(scene):
            return scene


class Tokenize:
    """Caption -> token ids (L,), padded to the tokenizer's max length; cached (there are few distinct captions)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """-> (B, L) int64."""
        tok = self.tokenizer
        for c in captions:
            if c not in self.cache:
                self.cache[c] = tok(c, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        return torch.tensor([self.cache[c] for c in captions], dtype=torch.long)


def make_batch(seed: int, index: int, batch_size: int, cfg: DataConfig, tokenize: Tokenize) -> Batch:
    """Batch number `index` of the run with seed `seed`."""
    rng = np.random.default_rng([seed, index])
    images, captions = [], []
    for _ in range(batch_size):
        scene = sample_training_scene(rng, cfg.two_object_prob)
        img, _ = render_scene(scene, cfg.size, int(rng.integers(2**63)))
        images.append(img)
        text = caption(scene, include_plain_word=bool(rng.random() < cfg.plain_word_prob))
        captions.append("" if rng.random() < cfg.empty_prob else text)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return Batch(index, x.contiguous(), tokenize(captions), captions)


class BatchStream:
    """Batches start, start + 1, ... Use as a context manager; it yields them in order.

    threaded: a daemon thread renders `ahead` batches in advance; else each batch is rendered when asked for.
    """

    def __init__(self, seed: int, start: int, batch_size: int, cfg: DataConfig, tokenizer, ahead: int = 4,
                 threaded: bool = False) -> None:
        self.args = (seed, batch_size, cfg, Tokenize(tokenizer))
        self.next_index = start
        self.threaded = threaded
        # Bounded: a few batches ahead is all the loop needs, and it caps memory.
        self.queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batch-renderer", daemon=True)

    def _run(self) -> None:
        seed, batch_size, cfg, tokenize = self.args
        index = self.next_index
        try:
            while not self.stop.is_set():
                self._put(make_batch(seed, index, batch_size, cfg, tokenize))
                index += 1
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(e)

    def _put(self, item: Batch | BaseException) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def __enter__(self) -> Iterator[Batch]:
        if not self.threaded:
            return self._inline()
        self.thread.start()
        return self._from_thread()

    def _inline(self) -> Iterator[Batch]:
        seed, batch_size, cfg, tokenize = self.args
        index = self.next_index
        while True:
            yield make_batch(seed, index, batch_size, cfg, tokenize)
            index += 1

    def _from_thread(self) -> Iterator[Batch]:
        while True:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
