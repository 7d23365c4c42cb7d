"""dvc.yaml is complete by construction: every file a stage imports and every params key it reads is declared.

The import closure is computed from the code (every `import` of a logitcache module,
at any depth of the file, from the stage's command in cli.py); the params keys a stage
reads are recorded while the stage really runs on a small slice of the data.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import yaml

from logitcache.core.config import Params, Section, load_params

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "logitcache"


def module_file(name: str) -> Path | None:
    """logitcache.a.b -> logitcache/a/b.py or logitcache/a/b/__init__.py (None outside the package)."""
    if name != "logitcache" and not name.startswith("logitcache."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    names = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return names


def closure(roots: list[str]) -> set[Path]:
    """Every file of the package that importing `roots` can execute, parent packages' __init__ included."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        for i in range(1, len(name.split(".")) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            path = module_file(".".join(name.split(".")[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            if path == PACKAGE / "cli.py":  # its top level and the command's function are among the roots
                continue
            tree = ast.parse(path.read_text())
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            todo += [m for m in imported_modules(tree, module, path.name == "__init__.py") if module_file(m)]
    return seen


def command_roots(command: str) -> list[str]:
    """The modules a `logitcache COMMAND` run imports: cli.py's top level plus that command's function."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    roots = set(imported_modules(ast.Module(body=top, type_ignores=[]), "logitcache.cli", False))
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for dec in fn.decorator_list:
            if isinstance(dec, ast.Call) and dec.args and getattr(dec.args[0], "value", None) == command:
                return sorted(roots | imported_modules(fn, "logitcache.cli", False) | {"logitcache.cli"})
    raise AssertionError(f"no command {command} in cli.py")


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, with foreach groups (a list of names, or a dict of name: value) expanded."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in spec.items():
        if "foreach" in stage:
            items = stage["foreach"]
            for key, item in items.items() if isinstance(items, dict) else ((item, item) for item in items):
                text = yaml.safe_dump(stage["do"]).replace("${key}", key).replace("${item}", item)
                out[f"{name}@{key}"] = yaml.safe_load(text)
        else:
            out[name] = stage
    return out


def student_stages() -> dict[str, str]:
    """Student name -> the dvc.yaml stage that trains it."""
    return {stage.partition("@")[2]: stage for stage in stages() if stage.startswith("train_student")}


def test_every_student_of_params_has_one_stage_with_its_init_file_as_a_dependency():
    students = yaml.safe_load((ROOT / "params.yaml").read_text())["students"]
    spec, trained = stages(), student_stages()
    assert sorted(trained) == sorted(students)
    assert len(trained) == sum(stage.startswith("train_student") for stage in spec), "a student trained twice"
    for name, cfg in students.items():
        stage = spec[trained[name]]
        assert trained[name] == ("train_student_init@" if cfg.get("init") else "train_student@") + name
        assert cfg["out"] == f"data/students/{name}" and f"students.{name}" in stage["params"]
        assert stage["cmd"].split()[:3] == ["logitcache", "train-student", name]
        if cfg.get("init"):
            assert cfg["init"] in stage["deps"] and f"{cfg['out']}/student.pt" in stage["outs"]
        else:
            assert f"{cfg['out']}/runs" in stage["outs"] and cfg["seeds"]


def covered(path: str, declared: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def param_covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


@pytest.mark.parametrize("stage", list(stages()))
def test_every_imported_file_is_a_declared_dependency(stage):
    spec = stages()[stage]
    command = spec["cmd"].split()[1]
    files = {str(p.relative_to(ROOT)) for p in closure(command_roots(command))}
    missing = sorted(f for f in files if not covered(f, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage} runs {missing} without declaring them in deps"


def test_closure_follows_imports_inside_functions():
    """The check itself can fail: cli.py imports the teacher only inside train-teacher's function."""
    files = {str(p.relative_to(ROOT)) for p in closure(command_roots("train-teacher"))}
    assert "logitcache/teacher/train.py" in files and "logitcache/core/models.py" in files
    assert "logitcache/student/train.py" not in files
    assert not covered("logitcache/core/models.py", ["logitcache/cli.py", "logitcache/teacher"])


# --- params keys: record which leaves of the validated config each stage reads while it runs ---


@contextlib.contextmanager
def recording(params: Params):
    """Log 'section.key' for every leaf value of `params` read (attribute access or model_dump) inside."""
    paths: dict[int, str] = {}
    keep: list = []  # ids must stay unique while recording
    reads: set[str] = set()

    def register(obj, path: str):
        if isinstance(obj, Section):
            paths[id(obj)] = path
            keep.append(obj)
            for name in type(obj).model_fields:
                register(object.__getattribute__(obj, name), f"{path}.{name}".lstrip("."))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                register(value, f"{path}.{key}")

    def leaves(obj, path: str):
        if isinstance(obj, Section):
            for name in type(obj).model_fields:
                leaves(object.__getattribute__(obj, name), f"{path}.{name}".lstrip("."))
        elif isinstance(obj, dict) and obj and all(isinstance(v, Section) for v in obj.values()):
            for key, value in obj.items():
                leaves(value, f"{path}.{key}")
        else:
            reads.add(path)

    original_get, original_copy, original_dump = Section.__getattribute__, Section.model_copy, Section.model_dump

    def get(self, name):
        value = original_get(self, name)
        path = paths.get(id(self))
        if path is not None and name in type(self).model_fields and not isinstance(value, (Section, dict)):
            reads.add(f"{path}.{name}".lstrip("."))
        return value

    def copy(self, *args, **kwargs):
        new = original_copy(self, *args, **kwargs)
        if id(self) in paths:
            register(new, paths[id(self)])
        return new

    def dump(self, *args, **kwargs):
        if id(self) in paths:
            leaves(self, paths[id(self)])
        return original_dump(self, *args, **kwargs)

    register(params, "")
    Section.__getattribute__, Section.model_copy, Section.model_dump = get, copy, dump
    try:
        yield reads
    finally:
        Section.__getattribute__, Section.model_copy, Section.model_dump = original_get, original_copy, original_dump


def test_recording_sees_reads_through_copies():
    params = load_params(ROOT / "params.yaml")
    with recording(params) as reads:
        params.teacher.model_copy(update={"seed": 3}).lr
        params.data.model_dump()
    assert "teacher.lr" in reads and "data.train_limit" in reads and "teacher.epochs" not in reads


@pytest.mark.slow
def test_every_params_key_a_stage_reads_is_declared(tmp_path, monkeypatch):
    """Run every stage for real (a small slice of the data, 1 epoch) and check its reads against dvc.yaml."""
    from logitcache.core.data import prepare_data
    from logitcache.deploy.export import export_checkpoint
    from logitcache.deploy.prune import prune_checkpoint
    from logitcache.student.train import train_student
    from logitcache.summary import summarize
    from logitcache.teacher.dump import dump_teacher
    from logitcache.teacher.train import train_teacher

    monkeypatch.chdir(tmp_path)
    students = yaml.safe_load((ROOT / "params.yaml").read_text())["students"]
    overrides = ["data.train_limit=256", "data.test_limit=128", "data.validation=25", "teacher.epochs=1", "teacher.workers=0",
                 "dump.views=2", "dump.workers=0"]
    overrides += [f"students.{n}.{k}" for n, cfg in students.items()
                  for k in ("steps=4", "evaluations=1", "workers=0", *(["seeds=[0]"] if cfg.get("seeds") else []))]
    overrides += ["export.latency_runs=2", "export.throughput_runs=1", "export.calibration_images=32"]
    params = load_params(ROOT / "params.yaml", overrides)
    spec = stages()
    runs = {"prepare_data": lambda: prepare_data(params.data), "train_teacher": lambda: train_teacher(params),
            "dump_teacher": lambda: dump_teacher(params),
            **{stage: (lambda n=n: train_student(params, n)) for n, stage in student_stages().items()},
            "prune_teacher": lambda: prune_checkpoint(params, "data/teacher/teacher.pt"),
            **{name: (lambda name=name: export_checkpoint(params, spec[name]["cmd"].split()[2], name.partition("@")[2]))
               for name in spec if name.startswith("export@")},
            "summary": lambda: summarize(params, "data/summary")}
    assert set(runs) == set(spec), "every stage of dvc.yaml is run here"
    for stage in spec:  # dvc.yaml's order: a stage's inputs are made before it
        run = runs[stage]
        with recording(params) as reads:
            run()
        missing = sorted(key for key in reads if not param_covered(key, spec[stage].get("params", [])))
        assert not missing, f"dvc.yaml stage {stage} reads params {missing} without declaring them"
