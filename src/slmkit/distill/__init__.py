"""Teachers -> data: text a teacher wrote (sequence-level distillation) and synthetic-data recipes."""
