"""Training: sub-models (LoRA or full) on the Hugging Face Trainer, the K-model executors
(local, Ray) and the training baselines (L2, EWC, replay, curation, soup ingredients).

    dtm.train_model(base, data, out, config)      # one model, resumable
    dtm.train(config, portions_dir, models_dir)   # all K sub-models
    dtm.train_baseline("ewc", config, data, out)  # a Table-1 baseline
"""

from dtm.errors import TrainingError
from dtm.training.baselines import curate, train_baseline
from dtm.training.executors import train, train_jobs
from dtm.training.sft import fraction_dir, is_complete, train_model

__all__ = ["TrainingError", "curate", "fraction_dir", "is_complete", "train", "train_baseline", "train_jobs", "train_model"]
