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
    ManagerClosedError,
    ModelInUseError,
    ModeNotAvailableError,
    OptionError,
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
from .request import Request, RequestScope
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
    "ManagerClosedError",
    "MergePolicyName",
    "ModeNotAvailableError",
    "ModeTable",
    "ModelInUseError",
    "OptionError",
    "Phase",
    "PhaseOrderError",
    "PhaseWork",
    "QuarantinedError",
    "RepairError",
    "Request",
    "RequestScope",
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
