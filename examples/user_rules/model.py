"""A model with a custom activation module and a custom loss, compiled with examples/user_rules/my_rules.py."""
import torch
from torch import nn


class Swish2(nn.Module):
    """x · σ(2x); its rule (the class name, lower-cased) comes from my_rules.py."""

    def forward(self, x):
        return x * torch.sigmoid(2 * x)


class LogCoshLoss(nn.Module):
    """Mean of log(cosh(z − t))."""

    reduction = "mean"

    def forward(self, z, t):
        return torch.log(torch.cosh(z - t)).mean()


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), Swish2(), nn.Linear(8, 3))
example_input = torch.zeros(2, 4)
loss_fn = LogCoshLoss()
