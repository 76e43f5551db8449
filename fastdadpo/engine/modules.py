"""The modules every engine wraps models in. The student's loss runs inside the wrapper's forward
(``fastdadpo.engine.interface`` says why): the decoder gives the final hidden states, and the
objective gets them with the LM-head weight as the engine has gathered it for this forward."""
from __future__ import annotations

from typing import Callable

import torch

from fastdadpo.models.loading import final_hidden_states, head_weight


class StudentWithObjective(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, compute: Callable):
        hidden = final_hidden_states(self.model, input_ids, attention_mask, position_ids)
        return compute(hidden, head_weight(self.model))


class HiddenStates(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return final_hidden_states(self.model, input_ids, attention_mask, position_ids)
