"""Logit distillation (`slm distill`): a student trained on a teacher's next-token distributions + the real text.
"""

from __future__ import annotations

from pathlib import Path

from slmkit.distill.kd import DistillConfig
from slmkit.model.config import PRESETS
from slmkit.recipes import model_dir
from slmkit.train.loop import TrainConfig, train


def distill(data: str | Path, out: str | Path, kd: DistillConfig, student: str = "micro",
            model_overrides: dict | None = None, student_from_teacher: int = 0, resume: bool = False, log=print,
            **options) -> dict:
    """Train a student on `data` (a token dataset prepared with the teacher's tokenizer, or a JSONL of fine-tuning
    records with an online teacher) under `kd`: the teacher online or its top-k cache, and the loss.

    The student is a preset (`student`, shaped by `model_overrides`), a model directory or pulled name to start
    from, or with `student_from_teacher` = N the teacher's tokenizer, embeddings and every Nth block (written once
    to OUT/student-init). `options` are TrainConfig fields (a budget is required). Returns the run's summary.
    """
    init_from = None
    if student_from_teacher:
        if not kd.teacher:
            raise ValueError("--student-from-teacher builds the student from --teacher; name one")
        from slmkit.distill.student_init import student_from_teacher as cut_student
        init_from = str(Path(out) / "student-init")
        if not Path(init_from).exists():
            cut_student(kd.teacher, init_from, layer_step=student_from_teacher)
    elif student not in PRESETS:
        init_from = model_dir(student, "a student")
    if init_from and model_overrides:
        raise ValueError("--set shapes a student preset; this student starts from a model directory")
    cfg = TrainConfig(data=str(data), out=str(out), preset="micro" if init_from else student,
                      model_overrides=model_overrides or {}, init_from=init_from, distill=kd, **options)
    return train(cfg, resume=resume, log=log)
