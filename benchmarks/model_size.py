"""Parameters and MACs of the student and the teachers, at the sizes BENCHMARKS.md uses.

    .venv/bin/python benchmarks/model_size.py
"""
from edgecl.models import build_student, build_teacher, count_macs, count_params

ROWS = [
    ("student MobileNetV2-Tiny, 1000 classes", build_student, (1000, 3, 144), (3, 144, 144)),
    ("student MobileNetV2-Tiny, 10 classes", build_student, (10, 1, 28), (1, 28, 28)),
    ("teacher ResNet-20, 10 classes", build_teacher, (10, 1, 28, "resnet20"), (1, 28, 28)),
    ("teacher ResNet-32, 10 classes", build_teacher, (10, 1, 28, "resnet32"), (1, 28, 28)),
    ("teacher ResNet-56, 10 classes", build_teacher, (10, 1, 28, "resnet56"), (1, 28, 28)),
    ("teacher ResNet-18, 10 classes", build_teacher, (10, 3, 144, "resnet18"), (3, 144, 144)),
]


def main() -> None:
    print("| model | input | parameters | MACs |")
    print("|---|---|---|---|")
    for name, build, args, shape in ROWS:
        model = build(*args)
        print(f"| {name} | {'x'.join(map(str, shape))} | {count_params(model) / 1e6:.3f} M | "
              f"{count_macs(model, shape) / 1e6:.1f} M |")


if __name__ == "__main__":
    main()
