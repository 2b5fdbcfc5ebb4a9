"""Splitting a model that is not an `nn.Sequential`, in one process: where it may be cut, the traced
stages compute the model, and a model torch cannot split stops with one sentence saying how to
restructure it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal.errors import ConfigError
from shoal.strategies.pipeline import Pipeline
from shoal.strategies.pipeline.model import shell
from shoal.strategies.pipeline.trace import (
    check_owners,
    check_traceable,
    loose_state,
    owner_names,
    trace_stages,
    units,
)
from tests.workers.pipe_models import GPT, Net


def test_blocks_are_children_with_parameters_and_list_entries():
    assert list(units(Net())) == ["conv1", "conv2", "fc1", "fc2"]  # dropouts hold nothing to balance
    gpt = GPT(layers=2)
    assert list(units(gpt)) == ["tok_emb", "blocks.0", "blocks.1", "ln_f", "head"]
    owners = owner_names(gpt, [["tok_emb", "blocks.0"], ["blocks.1", "ln_f", "head"]])
    assert "pos_emb" in owners[0] and "blocks.1.attn.c_proj.weight" in owners[1]
    held = shell(gpt, ["blocks.1", "ln_f", "head"])
    assert set(held.state_dict()) == {k for k in gpt.state_dict() if not k.startswith(("tok_emb", "blocks.0", "pos"))}
    gpt.register_buffer("scale", torch.ones(1))  # the root's own state goes with the first chunk
    loose = loose_state(gpt, [["tok_emb", "blocks.0"], ["blocks.1", "ln_f", "head"]])
    assert loose == ["pos_emb", "scale"]
    assert set(shell(gpt, ["tok_emb", "blocks.0", *loose]).state_dict()) == {
        k for k in gpt.state_dict() if k.startswith(("tok_emb", "blocks.0", "pos_emb", "scale"))
    }


def test_traced_stages_compute_the_model_in_each_mode():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 1, 28, 28)
    model.eval()
    first, second = trace_stages(model, ["fc1"], x, training=False)
    check_owners(model, [first, second], owner_names(model, [["conv1", "conv2"], ["fc1", "fc2"]]))
    torch.testing.assert_close(second(first(x)), model(x))
    assert model(x).equal(model(x))  # the user's model is left as it was (no split marks, same mode)
    assert not model.training
    first, second = trace_stages(model, ["fc1"], x, training=True)
    assert not second(first(x)).equal(second(first(x)))  # dropout is on in the training graph
    gpt, ids = GPT(layers=2).eval(), torch.randint(0, 16, (2, 8))
    first, second = trace_stages(gpt, ["blocks.1"], ids, training=False)
    torch.testing.assert_close(second(first(ids)), gpt(ids)[0])  # minGPT's (logits, None): the logits


def test_a_forward_with_two_inputs_is_refused_with_the_fix():
    class RNNModel(nn.Module):  # word_language_model's signature
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 4)

        def forward(self, input, hidden):
            return self.rnn(input, hidden)

    with pytest.raises(ConfigError, match=r"needs 2 \(input, hidden\); make the model an nn.Sequential of blocks"):
        check_traceable(RNNModel())


def test_data_dependent_control_flow_names_the_tracing_error_and_the_fix():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            x = self.a(x)
            if x.sum() > 0:  # depends on the data: torch.export cannot trace it
                x = -x
            return self.b(x)

    with pytest.raises(ConfigError, match=r"torch.export cannot trace Branchy.forward .*nn.Sequential"):
        trace_stages(Branchy(), ["b"], torch.randn(2, 4), training=True)


def test_modules_called_out_of_definition_order_are_refused():
    class Shuffled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x, self.z, self.y = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, h):
            return self.z(self.y(self.x(h)))

    model = Shuffled()
    stages = trace_stages(model, ["z"], torch.randn(2, 4), training=True)
    with pytest.raises(ConfigError, match="calls its modules in another order than it defines them"):
        check_owners(model, stages, owner_names(model, [["x"], ["z", "y"]]))


def test_two_outputs_are_refused():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            out = self.b(self.a(x))
            return out, out.sum()

    with pytest.raises(ConfigError, match=r"needs Pair\.forward to return one tensor"):
        trace_stages(Pair(), ["b"], torch.randn(2, 4), training=True)


def test_accumulation_and_clipping_options_are_checked():
    with pytest.raises(ConfigError, match="grad_accum"):
        Pipeline(grad_accum=0)
    with pytest.raises(ConfigError, match="'clip_norm' must be > 0"):
        Pipeline(clip_norm=0.0)
