"""DLLM2Rec-style distillation of teacher outputs into a SASRec student."""

from ilora.distill.train import DistillConfig, distill

__all__ = ["DistillConfig", "distill"]
