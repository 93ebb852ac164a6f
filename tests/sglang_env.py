"""sglang 0.5.23 on a CPU for the integration's tests: import-only stand-ins for the few modules its
multimodal_gen imports at module level but cannot load here (torchvision's CUDA build, IPython,
tvm_ffi, cache_dit: none of them runs in these tests), then sglang's real classes.

``load()`` returns the modules the tests use, or skips the test with the reason when sglang is not
installed (``make test`` installs it: tests/requirements-sglang.txt).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import socket
import sys
import types
from typing import Any

import pytest

STAND_INS = ("torchvision", "IPython", "tvm_ffi", "cache_dit")


class _Meta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __iter__(cls) -> Any:
        return iter(())


class _Anything(metaclass=_Meta):
    """Whatever a module-level import or class attribute asks of a stand-in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __iter__(self) -> Any:
        return iter(())

    def __bool__(self) -> bool:
        return False

    def __or__(self, other: object) -> _Anything:
        return self

    __ror__ = __or__


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = type(name, (_Anything,), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _loadable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


def load() -> types.SimpleNamespace:
    """sglang's modules the tests drive (a skip, with the reason, when sglang is not installed)."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed (make test installs tests/requirements-sglang.txt)")
    finder = _StandIns({n for n in STAND_INS if not _loadable(n)})
    sys.meta_path.insert(0, finder)
    try:
        return _import_sglang()
    finally:
        # the stand-ins serve sglang's imports only: the rest of the session (matplotlib looks
        # for IPython, transformers for torchvision) must find them absent, as they are
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] in finder.roots]:
            del sys.modules[name]


def _import_sglang() -> types.SimpleNamespace:
    from sglang.multimodal_gen.configs.pipeline_configs.ltx_2 import LTX2PipelineConfig
    from sglang.multimodal_gen.configs.sample.sampling_params import SamplingParams
    from sglang.multimodal_gen.runtime.managers.memory_managers.component_manager import ComponentResidencyManager
    from sglang.multimodal_gen.runtime.pipelines.ltx_2_pipeline import LTX2TwoStagePipeline
    from sglang.multimodal_gen.runtime.pipelines_core.executors.sync_executor import SyncExecutor
    from sglang.multimodal_gen.runtime.pipelines_core.schedule_batch import Req
    from sglang.multimodal_gen.runtime.pipelines_core.stages.model_specific_stages import ltx_2 as stages
    from sglang.multimodal_gen.runtime.pipelines_core.stages.validators import VerificationResult
    from sglang.multimodal_gen.runtime.server_args import ServerArgs, set_global_server_args

    return types.SimpleNamespace(
        LTX2PipelineConfig=LTX2PipelineConfig, SamplingParams=SamplingParams,
        ComponentResidencyManager=ComponentResidencyManager, LTX2TwoStagePipeline=LTX2TwoStagePipeline,
        SyncExecutor=SyncExecutor, Req=Req, stages=stages, VerificationResult=VerificationResult,
        ServerArgs=ServerArgs, set_global_server_args=set_global_server_args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_args(sg: types.SimpleNamespace) -> Any:
    """sglang's ServerArgs for the LTX-2 two-stage pipeline on this CPU (no model files: the
    pipeline config is given), made the process's global ones as sglang's stages expect."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    args = sg.ServerArgs(model_path="ltx2-tiny", pipeline_config=sg.LTX2PipelineConfig(),
                         pipeline_class_name="LTX2TwoStagePipeline")
    sg.set_global_server_args(args)
    return args


_distributed: list[bool] = []


def init_distributed(sg: types.SimpleNamespace) -> None:
    """sglang's model-parallel groups over gloo, one rank (its linear layers need them); once per process."""
    if _distributed:
        return
    from sglang.multimodal_gen.runtime.distributed.parallel_state import (
        maybe_init_distributed_environment_and_model_parallel,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    server_args(sg)
    maybe_init_distributed_environment_and_model_parallel(tp_size=1, sp_size=1)
    _distributed.append(True)


def native_dit(seed: int = 0) -> Any:
    """sglang's own LTX-2 DiT (ColumnParallelLinear/RowParallelLinear layers), two tiny blocks,
    seeded normal weights (sglang allocates them uninitialized)."""
    import torch
    from sglang.multimodal_gen.configs.models.dits.ltx_2 import LTX2ArchConfig, LTX2Config
    from sglang.multimodal_gen.runtime.models.dits import ltx_2

    arch = LTX2ArchConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32, in_channels=16,
                          out_channels=16, cross_attention_dim=64, caption_channels=64,
                          audio_num_attention_heads=2, audio_attention_head_dim=16, audio_in_channels=16,
                          audio_out_channels=16, audio_cross_attention_dim=32)
    generator = torch.Generator().manual_seed(seed)
    model = ltx_2.LTX2VideoTransformer3DModel(LTX2Config(arch_config=arch), hf_config={})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def native_inputs(seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([600.0]).view(1, 1)
    return dict(hidden_states=torch.randn(1, 32, 16, generator=g),
                audio_hidden_states=torch.randn(1, 5, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 6, 64, generator=g),
                audio_encoder_hidden_states=torch.randn(1, 6, 64, generator=g), timestep=t, audio_timestep=t,
                num_frames=2, height=4, width=4, audio_num_frames=5, return_latents=False)


def forward_context() -> Any:
    """What sglang's DiT forward reads (sglang's stages enter it around each call)."""
    from sglang.multimodal_gen.runtime.managers.forward_context import set_forward_context

    return set_forward_context(0, None)
