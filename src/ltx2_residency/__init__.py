"""ltx2_residency: a guarded weight-state machine for the LTX-2 DiT.

The public contract; everything else is an implementation detail.
"""

from . import testing
from .compiled import COMPILE_MODES, CompileSpec, compile_dit, compiled_graphs, is_compiled, no_recompiles
from .costmodel import LTX2_BLOCK_LINEARS, LTX2_BLOCKS, PhaseWork
from .domain import ApplyKind, MergePolicyName, Phase, ResidencyMode, WeightState, check_strength
from .errors import (
    CollectiveError,
    CollectiveTimeoutError,
    CompiledModuleError,
    ConfigError,
    DirtyWeightsError,
    EmbeddingError,
    ForwardGuardError,
    IllegalTransitionError,
    LoRACacheError,
    LoRAChangedError,
    LoRAFitError,
    LoRAFormatError,
    LoRAKeyError,
    LoRANameClashError,
    LoRAShapeError,
    LoRAValidationError,
    LoRAValueError,
    ManagerClosedError,
    ModelInUseError,
    ModeNotAvailableError,
    OptionError,
    PeerFailedError,
    PhaseOrderError,
    QuarantinedError,
    RankMismatchError,
    RepairError,
    RequestStateError,
    RequestTimeoutError,
    ResidencyError,
    StrengthError,
    UnknownLoRAError,
)
from .faults import POINTS as FAULT_POINTS
from .faults import FaultInjector
from .lora import LoRASpec, read_safetensors
from .manager import ResidencyManager
from .modes import REST_STATES, TABLES, ModeTable, mermaid
from .ops.fingerprint import Fingerprint, FingerprintPlan
from .options import ManagerOptions
from .registry import RegisteredLoRA
from .request import Request, RequestScope
from .trace import TransitionRecord

__all__ = [
    "COMPILE_MODES",
    "FAULT_POINTS",
    "LTX2_BLOCKS",
    "LTX2_BLOCK_LINEARS",
    "REST_STATES",
    "TABLES",
    "ApplyKind",
    "CollectiveError",
    "CollectiveTimeoutError",
    "CompileSpec",
    "CompiledModuleError",
    "ConfigError",
    "DirtyWeightsError",
    "EmbeddingError",
    "FaultInjector",
    "Fingerprint",
    "FingerprintPlan",
    "ForwardGuardError",
    "IllegalTransitionError",
    "LoRACacheError",
    "LoRAChangedError",
    "LoRAFitError",
    "LoRAFormatError",
    "LoRAKeyError",
    "LoRANameClashError",
    "LoRAShapeError",
    "LoRASpec",
    "LoRAValidationError",
    "LoRAValueError",
    "ManagerClosedError",
    "ManagerOptions",
    "MergePolicyName",
    "ModeNotAvailableError",
    "ModeTable",
    "ModelInUseError",
    "OptionError",
    "PeerFailedError",
    "Phase",
    "PhaseOrderError",
    "PhaseWork",
    "QuarantinedError",
    "RankMismatchError",
    "RegisteredLoRA",
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
    "UnknownLoRAError",
    "WeightState",
    "check_strength",
    "compile_dit",
    "compiled_graphs",
    "is_compiled",
    "mermaid",
    "no_recompiles",
    "read_safetensors",
    "testing",
]

__version__ = "0.3.0"
