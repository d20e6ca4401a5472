"""Training operations around a model: callbacks that show samples and keep checkpoints
(``callbacks.py``), atomic writes (``atomic.py``), checkpoint manifests and the newest complete
checkpoint (``manifest.py``), adapters-only checkpoints of LoRA policies (``checkpoints.py``), held-out
evaluation against the reference (``evaluation.py``), exact resume (``resume.py``) and export as
a Hugging Face model directory (``export.py``).

This floor builds on :mod:`agents.policy` and :mod:`agents.algorithms`; nothing below imports it.
"""

from agents.training.callbacks import RollingCheckpointCallback, SampleTextCallback
from agents.training.distributed import data_parallel, local_device
from agents.training.checkpoints import load_adapters, save_adapters
from agents.training.evaluation import TextEvaluation, evaluate_against_reference, sample_episodes
from agents.training.export import export_pretrained
from agents.training.manifest import Checkpoint, latest_checkpoint, verify_checkpoint
from agents.training.resume import load_algorithm, load_training_state, resume_latest, save_training_state

__all__ = [
    "Checkpoint",
    "RollingCheckpointCallback",
    "SampleTextCallback",
    "TextEvaluation",
    "data_parallel",
    "evaluate_against_reference",
    "export_pretrained",
    "latest_checkpoint",
    "load_adapters",
    "load_algorithm",
    "load_training_state",
    "local_device",
    "resume_latest",
    "sample_episodes",
    "save_adapters",
    "save_training_state",
    "verify_checkpoint",
]
