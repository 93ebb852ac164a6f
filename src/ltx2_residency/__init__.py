"""ltx2_residency: a guarded weight-state machine for the LTX-2 DiT.

The public contract; everything else is an implementation detail.
"""

from .costmodel import PhaseWork
from .domain import ApplyKind, MergePolicyName, Phase, ResidencyMode, WeightState
from .errors import (
    ConfigError,
    DirtyWeightsError,
    ForwardGuardError,
    IllegalTransitionError,
    LoRAFormatError,
    LoRAKeyError,
    LoRAShapeError,
    LoRAValidationError,
    LoRAValueError,
    ModeNotAvailableError,
    PhaseOrderError,
    QuarantinedError,
    RepairError,
    RequestStateError,
    RequestTimeoutError,
    ResidencyError,
    StrengthError,
)
from .faults import FaultInjector
from .lora import LoRASpec
from .machine import TABLES, ModeTable, mermaid
from .manager import ResidencyManager
from .ops.fingerprint import Fingerprint
from .request import Request
from .trace import TransitionRecord

__all__ = [
    "TABLES",
    "ApplyKind",
    "ConfigError",
    "DirtyWeightsError",
    "FaultInjector",
    "Fingerprint",
    "ForwardGuardError",
    "IllegalTransitionError",
    "LoRAFormatError",
    "LoRAKeyError",
    "LoRAShapeError",
    "LoRASpec",
    "LoRAValidationError",
    "LoRAValueError",
    "MergePolicyName",
    "ModeNotAvailableError",
    "ModeTable",
    "Phase",
    "PhaseOrderError",
    "PhaseWork",
    "QuarantinedError",
    "RepairError",
    "Request",
    "RequestStateError",
    "RequestTimeoutError",
    "ResidencyError",
    "ResidencyManager",
    "ResidencyMode",
    "StrengthError",
    "TransitionRecord",
    "WeightState",
    "mermaid",
]

__version__ = "0.1.0"
