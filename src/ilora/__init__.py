"""iLoRA: instance-wise LoRA teachers for sequential recommendation, distilled into SASRec.

The package reads like the pipeline:

    data/     datasets, readers, candidate sets          (ilora.data)
    rec/      SASRec sequence encoder: model, train, eval (ilora.rec)
    teacher/  prompts, gated LoRA adapters, the LLM teacher (ilora.teacher)
    cli/      a thin command line on top                  (ilora.cli)
"""

__version__ = "0.1.0"
