"""Students: the SiT transformer that learns from the teacher."""
from sitdistill.students.sit import PRESETS, SiT, LoadReport, build_student, count_parameters

__all__ = ["PRESETS", "SiT", "LoadReport", "build_student", "count_parameters"]
