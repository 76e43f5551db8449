"""The objectives' public API, where users import it from (``from fastdadpo.objectives import
dpo_loss``): the per-pair losses (the contract), every objective, and what a new one declares and
registers. They live in ``fastdadpo.core``; this module only names them for users."""
from fastdadpo.core.losses import LOSS_TYPES, dadpo_loss, dadpo_margin, dpo_loss, sequence_logps
from fastdadpo.core.objectives import (ADPA, DCKD, DEFAULT_OBJECTIVE, DPO, DaDPO, DaDPOToken, KD, OBJECTIVES, Objective,
                                       ParameterError, SFT, objective_table, parameter, register_objective)
from fastdadpo.core.step import Head, KernelCall, Needs, Normalizers, ObjectiveOutput, StepInputs

__all__ = ["LOSS_TYPES", "dadpo_loss", "dadpo_margin", "dpo_loss", "sequence_logps", "ADPA", "DCKD",
           "DEFAULT_OBJECTIVE", "DPO", "KD", "OBJECTIVES", "SFT", "DaDPO", "DaDPOToken", "Objective", "ParameterError",
           "objective_table", "parameter", "register_objective", "Head", "KernelCall", "Needs", "Normalizers",
           "ObjectiveOutput", "StepInputs"]
