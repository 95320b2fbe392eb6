"""dpkd: Direct Preference Knowledge Distillation for language models, with its baselines."""

__version__ = "0.1.0"

# Heavy imports (transformers.Trainer) are deferred so that `dpkd --version` and `import dpkd.losses`
# stay fast.
_LAZY = {
    "DistillationConfig": "dpkd.config",
    "DistillationTrainer": "dpkd.trainer",
    "load_instruction_data": "dpkd.data",
    "compute_metrics": "dpkd.evaluation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpkd' has no attribute {name!r}")
