"""The table behind `edgecl methods` (edgecl/cli/methods.py): every loss term, what it does, its
parameters and defaults, and the memory it adds on a device, computed for a concrete student
(by default the one Split-MNIST trains)."""
from __future__ import annotations

DEFAULT_INPUT = (1, 28, 28)
DEFAULT_CLASSES = 10


def method_table(input_shape=DEFAULT_INPUT, classes: int = DEFAULT_CLASSES) -> dict:
    """Every registered term with its description, defaults and the bytes it adds for the
    student a learner builds for `input_shape` and `classes` (LearnerConfig defaults)."""
    from edgecl.learn import LearnerConfig
    from edgecl.learn.terms import TERMS
    from edgecl.models import build_student, build_teacher, model_bytes

    config = LearnerConfig()
    c, h, w = input_shape
    student = build_student(classes, c, max(h, w), min_final_map=config.min_final_map,
                            relax=config.stride_relax, bn_momentum=config.bn_momentum)
    teacher = build_teacher(classes, c, max(h, w), config.teacher_arch)
    terms = []
    for name, cls in TERMS.items():
        params = dict(cls.defaults)
        terms.append({"name": name, "describe": cls.describe, "defaults": params,
                      "memory_bytes": int(cls.memory_bytes(student, input_shape, params)),
                      "memory_note": cls.memory_note})
    return {"input_shape": list(input_shape), "classes": classes,
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_arch": teacher.arch, "teacher_bytes": model_bytes(teacher),
            "buffer_bytes_per_sample": c * h * w + 16 + 4 * classes,  # uint8 input, label, width, logits
            "terms": terms}


def render(table: dict) -> str:
    shape = "x".join(str(v) for v in table["input_shape"])
    lines = [
        f"Memory added is for the default student: MobileNetV2-Tiny built for {shape} inputs "
        f"and {table['classes']} classes ({table['student_params']:,} parameters, float32; "
        "--input and --classes change it).",
        "Combine terms with '+': --method derpp+ewcpp+pod ('finetune' for none). Parameters: "
        "[learner.terms.NAME] in edgecl.toml, e.g. [learner.terms.ewc] lam = 10.0.",
        "",
    ]
    width = max(len(t["name"]) for t in table["terms"])
    for t in table["terms"]:
        params = ", ".join(f"{k} = {v!r}" for k, v in t["defaults"].items()) or "none"
        lines += [f"{t['name']:<{width}}  {t['describe']}",
                  f"{'':<{width}}  parameters: {params}",
                  f"{'':<{width}}  memory added: {t['memory_bytes']:,} bytes "
                  f"({t['memory_bytes'] / 1024:,.1f} KB): {t['memory_note']}"]
    lines += ["",
              f"Not per term: the replay buffer holds {table['buffer_bytes_per_sample']:,} bytes "
              "per sample (raw uint8 input, label, stored logits); a teacher (teacher = online or "
              f"frozen:PATH; kd needs one) is a {table['teacher_arch']} of "
              f"{table['teacher_bytes']:,} bytes ({table['teacher_bytes'] / 1024:,.1f} KB)."]
    return "\n".join(lines)
