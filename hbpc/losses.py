"""Loss modules hbpc compiles besides torch's own (``loss_fn`` of a model file)."""
from torch import nn


class TokenCrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` with the classes on the last axis: logits ``(N, *S, C)``, labels ``(N, *S)``.

    The same loss as ``nn.CrossEntropyLoss()(logits.movedim(-1, 1), labels)`` (same ``ignore_index``, ``reduction``
    and ``label_smoothing``): the mean is over the tokens whose label is not ``ignore_index``.
    """

    def forward(self, input, target):
        return super().forward(input.movedim(-1, 1), target)
