"""Gradient accumulation that scores every micro-batch against the whole effective batch.

Plain accumulation averages separate micro-batch losses, so a contrastive loss sees only one
micro-batch of negatives. Here, as with OpenCLIP's ``--accum-freq``, the objective is that of
the concatenated micro-batches; its gradient is obtained the GradCache way (Gao et al., 2021),
which also counts the loss heads' gradient exactly once:

1. micro-batch 0 runs forward with grad, the others without (their features are cached);
2. the objective runs once on all features held as leaves, and is back-propagated: this gives
   the gradients of the loss heads (logit scales, fusion, ITM head) and of every feature row;
3. each cached micro-batch runs forward again with grad and back-propagates its rows' feature
   gradients (micro-batch 0 reuses its graph).

Dropout masks are replayed (each re-run starts from the RNG state of its first run) and buffers
(batch-norm running statistics) are put back after the re-runs, so each micro-batch updates
them once. The gradient equals that of one pass over the concatenated batch: accumulation
changes memory and speed, not the objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from xmodal.models.model import Features, cat_features

Batch = tuple[Features, Features, torch.Tensor]
FeatureFn = Callable[[dict], Batch]
ObjectiveFn = Callable[[Features, Features, torch.Tensor], dict[str, torch.Tensor]]
_GRAD_FIELDS = ("embeds", "projected", "tokens")


def accumulated_backward(
    model: nn.Module, micro: Sequence[dict], features: FeatureFn, objective: ObjectiveFn
) -> dict[str, torch.Tensor]:
    """Back-propagate ``objective`` over the concatenation of the ``micro`` batches.

    ``features(batch)`` returns (image, text, image_ids) of one micro-batch; ``objective``
    scores features into a dict of terms with the total under ``"loss"``. Gradients are
    accumulated into the parameters' ``.grad``; the detached terms are returned.
    """
    if len(micro) == 1:
        terms = objective(*features(micro[0]))
        terms["loss"].backward()
        return {name: value.detach() for name, value in terms.items()}
    live = features(micro[0])
    cached, states = [], []
    with torch.no_grad():
        for batch in micro[1:]:
            states.append(_rng_state())
            cached.append(features(batch))
    resume_state, buffers = _rng_state(), [b.detach().clone() for b in model.buffers()]
    parts = [(_detach(live[0]), _detach(live[1]), live[2]), *cached]
    image = _leaves(cat_features([p[0] for p in parts]), live[0])
    text = _leaves(cat_features([p[1] for p in parts]), live[1])
    terms = objective(image, text, torch.cat([p[2] for p in parts]))
    terms["loss"].backward()
    _backward_rows(live, image, text, 0)
    offset = len(live[2])
    for batch, state in zip(micro[1:], states, strict=True):
        _set_rng_state(state)
        again = features(batch)
        _backward_rows(again, image, text, offset)
        offset += len(again[2])
    _set_rng_state(resume_state)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    return {name: value.detach() for name, value in terms.items()}


def _detach(features: Features) -> Features:
    return Features(
        features.embeds.detach(),
        features.projected.detach(),
        features.tokens.detach(),
        features.mask,
    )


def _leaves(features: Features, like: Features) -> Features:
    """Leaf copies of the differentiable fields, needing grad where ``like``'s fields do."""
    values = {
        name: getattr(features, name).detach().requires_grad_(getattr(like, name).requires_grad)
        for name in _GRAD_FIELDS
    }
    return Features(**values, mask=features.mask)


def _backward_rows(batch: Batch, image: Features, text: Features, offset: int) -> None:
    """Back-propagate the leaf gradients of rows [offset, offset + n) through ``batch``."""
    tensors, grads = [], []
    for features, leaves in ((batch[0], image), (batch[1], text)):
        rows = slice(offset, offset + len(features.embeds))
        for name in _GRAD_FIELDS:
            value, leaf = getattr(features, name), getattr(leaves, name)
            if value.requires_grad and not leaf.requires_grad:
                raise RuntimeError(f"accumulation: {name} needs grad in a re-run only")
            if value.requires_grad and leaf.grad is not None:
                grad = leaf.grad[rows]
                tensors.append(value)
                grads.append(grad[:, : value.shape[1]] if name == "tokens" else grad)
    if tensors:
        torch.autograd.backward(tensors, grads)


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
