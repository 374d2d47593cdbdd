"""Multi-layer perceptron split into one stage per Linear layer.

The smallest bundled model: a quick baseline for ZO training on tiny inputs such as 8x8 digits.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .registry import register_model


@register_model("mlp")
def mlp(in_features: int, num_classes: int, hidden: Sequence[int] = (128,)) -> nn.Sequential:
    """Flatten + Linear/ReLU per hidden width + output Linear, one stage per Linear.

    Stage 0 also holds the Flatten so every stage takes and returns a single tensor.
    With ``hidden=()`` the model is a single stage: Flatten + Linear (logistic regression).
    """
    widths = [in_features, *hidden]
    stages: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers = [nn.Linear(fan_in, fan_out), nn.ReLU()]
        stages.append(nn.Sequential(nn.Flatten(), *layers) if i == 0 else nn.Sequential(*layers))
    head = nn.Linear(widths[-1], num_classes)
    stages.append(nn.Sequential(nn.Flatten(), head) if not stages else head)
    return nn.Sequential(*stages)
