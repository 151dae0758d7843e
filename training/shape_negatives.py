"""Shape hard negatives for the teacher: the same noisy image, scored under a caption whose shape was swapped.

Why (issue 17, item 0): the teacher trained with the plain flow loss reads colour from the caption
but not shape. Its velocity error with the true caption and with one whose shape word was swapped
differ by 0.0002 at every noise level, while a colour swap costs 0.006 to 0.04 and the null caption
0.02. Colour moves most pixels of an image at high noise, a shape only an object's edges, so the
flow loss barely rewards reading the shape word. The hinge below asks that a caption naming an
absent shape predict the velocity worse than the true caption, by a margin, at noise levels where
the shape cannot yet be read off x_sigma itself; a model can only meet it by reading the shape word.

``--shape-negatives W`` (``TeacherConfig.shape_negatives``) adds W times that hinge to the flow
loss; W = 0 is the plain recipe, bit for bit (nothing is drawn).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from engine.anchors import Conditioning, flux_velocity, null_conditioning
from training.generator_data import encode_texts, stack_conditioning, trim
from training.generator_shared import noisy_batch

MARGIN = 1.2  # the swapped caption's error must exceed the true one's by 20%
MIN_SIGMA = 0.5  # below this much noise the shape is visible in x_sigma: no text needed to keep it


def _phrases(vocab) -> list:
    """(words of a shape phrase, shape), longest first so that "star shape" wins over "star"."""
    pairs = [(tuple(p.split()), shape) for shape, words in vocab.shapes.items() for p in words]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def shape_mentions(caption: str, vocab) -> list:
    """(first word index, word count, shape) of each shape phrase that follows a colour word: the
    captions' grammar is "[size] colour shape", so the colour word marks where an object's shape is."""
    words = caption.split()
    colours = {w for synonyms in vocab.colours.values() for w in synonyms}
    found = []
    for i in range(1, len(words)):
        if words[i - 1] not in colours:
            continue
        for phrase, shape in _phrases(vocab):
            if tuple(words[i:i + len(phrase)]) == phrase:
                found.append((i, len(phrase), shape))
                break
    return found


def _picker(gen: torch.Generator) -> Callable[[int], int]:
    """``pick(n)`` for :func:`swap_shape`: a draw in [0, n) from ``gen`` (so a resumed run draws the same)."""
    return lambda n: int(torch.randint(n, (1,), generator=gen))


def swap_shape(caption: str, vocab, pick: Callable[[int], int]) -> str | None:
    """The caption with one object's shape phrase replaced by a synonym of a shape it does not name;
    None when it names no shape after a colour word, or every shape. ``pick(n)`` draws in [0, n)."""
    mentions = shape_mentions(caption, vocab)
    absent = sorted(set(vocab.shapes) - {shape for _, _, shape in mentions})
    if not mentions or not absent:
        return None
    start, length, _ = mentions[pick(len(mentions))]
    new_shape = absent[pick(len(absent))]
    synonyms = vocab.shapes[new_shape]
    words = caption.split()
    words[start:start + length] = synonyms[pick(len(synonyms))].split()
    return " ".join(words)


def flow_loss_with_negatives(transformer, x0, cond: Conditioning, img_ids, gen: torch.Generator,
                             negatives: Callable, weight: float, velocity=flux_velocity) -> tuple:
    """(loss, hinge rows): the rectified-flow loss of :func:`training.generator_shared.flow_loss` (the
    same draws in the same order) plus ``weight`` x sum over hinge rows of
    relu(MARGIN * err(true caption) - err(swapped caption)) / batch, where err is a row's velocity MSE
    on the same x_sigma and sigma. ``negatives(rows)`` takes candidate row indices (sigma >= MIN_SIGMA,
    conditioning not dropped) and returns (the rows it found a swap for, their Conditioning). Both
    captions go through the transformer in one batch."""
    x_sigma, sigma, target = noisy_batch(x0, gen)
    candidates = torch.nonzero((sigma >= MIN_SIGMA) & cond.mask.any(1)).flatten()
    rows, neg = negatives(candidates) if len(candidates) else (candidates, None)
    batch = x0.shape[0]
    if len(rows):
        joint = stack_conditioning([cond, neg])
        pred = velocity(transformer, torch.cat([x_sigma, x_sigma[rows]]), torch.cat([sigma, sigma[rows]]), joint,
                        img_ids)
        target = torch.cat([target, target[rows]])
    else:
        pred = velocity(transformer, x_sigma, sigma, cond, img_ids)
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    loss = err[:batch].mean()
    if len(rows):
        loss = loss + weight * F.relu(MARGIN * err[rows] - err[batch:]).sum() / batch
    return loss, len(rows)


def negative_source(prompts: list, vocab, encoder, gen: torch.Generator) -> Callable:
    """A ``negatives`` callable for :func:`flow_loss_with_negatives` over one batch's prompts: swaps
    with draws from ``gen`` (so a resumed run draws the same), encodes the swapped captions with the
    training text encoder as the true ones were (encode_texts: fp16, as the text cache stores them)."""

    pick = _picker(gen)

    def negatives(candidates):
        rows, texts = [], []
        for r in candidates.tolist():
            swapped = swap_shape(prompts[r], vocab, pick)
            if swapped is not None:
                rows.append(r)
                texts.append(swapped)
        if not rows:
            return torch.zeros(0, dtype=torch.long), None
        return torch.tensor(rows), trim(encode_texts(encoder, texts, progress=False))

    return negatives


# ---------------------------------------------------------------------------------------------
# Shape-contrastive guidance (for distillation targets)


def swapped_captions(prompts: list, vocab, swaps: int, gen: torch.Generator) -> list:
    """``swaps`` lists of len(prompts) captions: list j holds each prompt with one shape phrase swapped
    (:func:`swap_shape`, drawn from ``gen``), or the prompt itself where it names no shape to swap, so
    that such a row gets no contrast (its negative velocity is its own)."""

    pick = _picker(gen)
    return [[swap_shape(p, vocab, pick) or p for p in prompts] for _ in range(swaps)]


def shape_guided_velocity(transformer, x, sigma, cond: Conditioning, img_ids, guidance: float,
                          negatives: Conditioning, weight: float) -> torch.Tensor:
    """v_u + g (v_c - v_u) + w (v_c - mean_j v_j): classifier-free guidance plus a push away from the
    same caption with its shape swapped (like a negative prompt, averaged over the swaps j).

    Why (issue 17, item 0): the teacher's velocity barely depends on the shape word (the probe of
    bench/shape_reading.py), so plain guidance, which amplifies the whole caption against the null one,
    cannot single it out, while v_c - v_j is what the shape word alone changes. ``negatives`` holds
    k blocks of B rows (block j: every row's j-th swap, :func:`swapped_captions`); all 2 + k
    conditionings go through the transformer as one batch."""
    b = x.shape[0]
    k = negatives.tokens.shape[0] // b
    if k * b != negatives.tokens.shape[0] or k < 1:
        raise ValueError(f"negatives must be k >= 1 blocks of {b} rows, got {negatives.tokens.shape[0]} rows")
    joint = stack_conditioning([cond, null_conditioning(cond), negatives])
    v = flux_velocity(transformer, x.repeat(2 + k, 1, 1), sigma.repeat(2 + k), joint, img_ids)
    v_c, v_u = v[:b], v[b:2 * b]
    v_n = v[2 * b:].reshape(k, *v_c.shape).mean(0)
    return v_u + guidance * (v_c - v_u) + weight * (v_c - v_n)
