import ltx2_residency

PINNED = {
    "TABLES", "ApplyKind", "ConfigError", "DirtyWeightsError", "FaultInjector", "Fingerprint",
    "ForwardGuardError", "IllegalTransitionError", "LoRAFormatError", "LoRAKeyError",
    "LoRAShapeError", "LoRASpec", "LoRAValidationError", "LoRAValueError", "ManagerClosedError",
    "MergePolicyName", "ModelInUseError", "OptionError", "RequestScope",
    "ModeNotAvailableError", "ModeTable", "Phase", "PhaseOrderError", "PhaseWork", "QuarantinedError",
    "RepairError", "Request", "RequestStateError", "RequestTimeoutError", "ResidencyError",
    "ResidencyManager", "ResidencyMode", "StrengthError", "TransitionRecord", "WeightState",
    "mermaid",
    # what the pipeline and the tools need, made public: fault points, rest states, LTX-2 shapes,
    # repeated fingerprints, strength and LoRA-file checks, the testing helpers
    "FAULT_POINTS", "REST_STATES", "LTX2_BLOCKS", "LTX2_BLOCK_LINEARS", "FingerprintPlan", "check_strength",
    "read_safetensors", "testing",
    # one frozen dataclass of the manager's options
    "ManagerOptions",
    # the DiT under torch.compile: how to compile it, and how to see it does not recompile
    "COMPILE_MODES", "CompileSpec", "CompiledModuleError", "compile_dit", "compiled_graphs", "is_compiled",
    "no_recompiles",
    # LoRAs chosen per request: the registry's entries and refusals
    "RegisteredLoRA", "LoRANameClashError", "UnknownLoRAError", "LoRAChangedError", "LoRAFitError", "LoRACacheError",
    "EmbeddingError",
    # several ranks in lock-step: what a rank raises when the group cannot act together
    "CollectiveError", "PeerFailedError", "CollectiveTimeoutError", "RankMismatchError",
}


def test_public_names_are_pinned() -> None:
    # Serving code relies on these names: changing the set is a deliberate API change.
    assert set(ltx2_residency.__all__) == PINNED
    for name in PINNED:
        assert getattr(ltx2_residency, name) is not None


def test_errors_share_one_family() -> None:
    errors = [getattr(ltx2_residency, n) for n in PINNED if n.endswith("Error")]
    assert all(issubclass(e, ltx2_residency.ResidencyError) for e in errors)


def test_core_does_not_import_the_pipelines_dependencies() -> None:
    # the core installs without the pipeline extra (tests/test_packaging.py runs it without them)
    import subprocess
    import sys

    code = ("import sys, ltx2_residency, ltx2_residency.testing, ltx2_residency.diagrams; "
            "print(sorted({m.partition('.')[0] for m in sys.modules} & {'diffusers', 'av', 'rich'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr
