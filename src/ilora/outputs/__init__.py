"""Teacher outputs: the documented on-disk contract between the teacher and distillation."""

from ilora.outputs.format import TeacherOutputs, read_teacher_outputs

__all__ = ["TeacherOutputs", "read_teacher_outputs"]
