"""Frozen teachers: ``load_teacher(source, family=None, **options)`` and the families it knows."""
from .base import Teacher
from .sd import TEACHER_FAMILIES, SD15Teacher, SDXLTeacher, detect_family, load_teacher

__all__ = ["Teacher", "SD15Teacher", "SDXLTeacher", "TEACHER_FAMILIES", "detect_family", "load_teacher"]
