"""iLoRA: instance-wise LoRA teachers for sequential recommendation, distilled into SASRec.

The package reads like the pipeline:

    data/      datasets, readers, candidate sets                       (ilora.data)
    rec/       SASRec sequence encoder: model, train, eval              (ilora.rec)
    teacher/   prompts, gated LoRA adapters, the LLM teacher, training  (ilora.teacher)
    outputs/   teacher-output export and its format, DLLM2Rec files     (ilora.outputs)
    distill/   DLLM2Rec-style distillation into a SASRec student        (ilora.distill)
    pipeline/  `ilora run`: the stages end to end, the report           (ilora.pipeline)
    bench/     `ilora bench`: the benchmarks and their reference variants (ilora.bench)
    cli/       a thin command line on top                               (ilora.cli)

Beside them: configuration (config.py), checkpoints and atomic writes (checkpointing.py,
state_io.py), output-directory locks (dir_lock.py), data parallelism (distributed.py),
metrics logs (metrics_log.py), progress bars (progress.py) and errors (errors.py).
"""

__version__ = "0.1.0"
