"""SASRec sequence encoder: the model, its metrics, training, evaluation and LLaRA import."""

from ilora.rec.sasrec import SASRec, SASRecConfig, load_sasrec

__all__ = ["SASRec", "SASRecConfig", "load_sasrec"]
