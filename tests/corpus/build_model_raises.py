# build_model() raises.
# expect: build_model() raised ValueError: no weights here
# expect: {here}
# expect: make build_model() return an nn.Module
import torch


def build_model():
    raise ValueError("no weights here")  # here


example_input = torch.zeros(2, 3)
