"""The `logitcache` command: a thin click layer over the library's plain functions.

Every command reads params.yaml (one section per stage); its flags and `-S key=value`
override single keys, and the result is validated once into `config.Params`.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from logitcache.core.errors import LogitcacheError


class Group(click.Group):
    """Turns LogitcacheError into one line on stderr and exit code 2 (traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        from logitcache.core import interrupt

        interrupt.install()
        try:
            return super().invoke(ctx)
        except LogitcacheError as e:
            if ctx.params.get("debug"):
                raise
            _error(_own_line(e))
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            _error(f"interrupted; unfinished outputs were not written; {_how_to_continue(ctx)}")
            sys.exit(130)


def _error(message: str) -> None:
    """`error: ...` on a line of its own: a progress bar the error stopped is closed first, so the line does not
    continue the bar's."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    click.echo(f"error: {message}", err=True)


def _how_to_continue(ctx: click.Context) -> str:
    command = ctx.invoked_subcommand
    if command in ("train-teacher", "train-student"):
        return "rerun the same command with --resume to continue"
    if command == "dump-teacher":
        return "rerun the same command (same arguments) to resume the dump"
    return "rerun the same command"


def _own_line(error: LogitcacheError) -> str:
    """The error's one line, also when a DataLoader worker re-raised it wrapped in its traceback text."""
    lines = str(error).strip().splitlines()
    if len(lines) < 2:
        return str(error)
    return lines[-1].partition("LogitcacheError: ")[2] or lines[-1]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="logitcache")
def main(debug: bool) -> None:
    """Run the teacher once, distil many students.

    \b
    logitcache prepare-data      # Fashion-MNIST -> data/prepared
    logitcache train-teacher     # -> data/teacher/teacher.pt
    """


def params_options(flags: dict[str, str]):
    """Add --params, -S/--set and the given shortcut flags (flag name -> params key) to a command."""

    def decorate(fn):
        @click.option("--params", "params_path", type=click.Path(), default=None,
                      help="YAML params file [default: ./params.yaml when present, else built-in defaults].")
        @click.option("-S", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override one params key, e.g. -S teacher.epochs=3 (repeatable).")
        @functools.wraps(fn)
        def wrapper(params_path, overrides, **kwargs):
            params = _load_params(flags, params_path, overrides, kwargs)
            return fn(params, **{k: v for k, v in kwargs.items() if k not in flags})

        wrapper.params_flags = flags  # check_command_line validates a command's params without running it
        for name, key in reversed(flags.items()):
            wrapper = click.option(f"--{name.replace('_', '-')}", name, default=None,
                                   help=f"Override {key}.")(wrapper)
        return wrapper

    return decorate


def _load_params(flags: dict[str, str], params_path, overrides, kwargs: dict):
    """The validated params of one command: the file, then its shortcut flags, then its -S overrides."""
    from logitcache.core.config import load_params

    shortcuts = {f"--{name.replace('_', '-')}": f"{flags[name]}={value}" for name, value in kwargs.items()
                 if name in flags and value is not None}
    return load_params(params_path, list(overrides), flags=shortcuts)


def check_command_line(argv: list[str]) -> None:
    """Parse `logitcache ARGV` as the command would, and validate its params, without running the command.

    A bad option or argument raises click.UsageError; a bad params key or value raises LogitcacheError.
    The documentation's examples are checked this way (tests/test_docs.py).
    """
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))  # the group's options are flags
    if at == len(argv):
        raise click.UsageError("no command given")
    name, rest = argv[at], list(argv[at + 1:])
    with main.make_context("logitcache", [*argv[:at], name]) as ctx:
        command = main.get_command(ctx, name)
        if command is None:
            raise click.UsageError(f"no such command {name!r}", ctx)
        with command.make_context(name, rest, parent=ctx) as sub:
            flags = getattr(command.callback, "params_flags", None)
            if flags is not None:
                kwargs = {k: v for k, v in sub.params.items() if k not in ("params_path", "overrides")}
                _load_params(flags, sub.params["params_path"], sub.params["overrides"], kwargs)


@main.command("prepare-data")
@params_options({"dataset": "data.dataset", "source": "data.source", "root": "data.root"})
def prepare_data_cmd(params) -> None:
    """Read a data set's raw files and write uint8 arrays plus meta.json (with split fingerprints).

    \b
    Example:
      logitcache prepare-data                      # Fashion-MNIST from Debian's package
      logitcache prepare-data --dataset cifar10 --source ~/data/cifar10
    """
    from logitcache.core.data import dataset_dir, prepare_data

    meta = prepare_data(params.data)
    for split, info in meta["splits"].items():
        click.echo(f"{split}: {info['count']} samples, fingerprint {info['fingerprint'][:16]}")
    click.echo(f"wrote {dataset_dir(params.data)}")


@main.command("train-teacher")
@params_options({"model": "teacher.model", "epochs": "teacher.epochs", "out": "teacher.out",
                 "device": "teacher.device", "seed": "teacher.seed"})
@click.option("--resume", is_flag=True, help="Continue from <out>/resume.pt (saved after every epoch).")
def train_teacher_cmd(params, resume) -> None:
    """Train the teacher with SGD and a one-cycle or cosine schedule; writes teacher.pt and metrics.json.

    Under torchrun (torchrun --nproc-per-node N -m logitcache train-teacher) it trains with DDP.

    \b
    Example:
      logitcache train-teacher --model resnet20 --epochs 5
      logitcache train-teacher -S teacher.lr=0.05 -S teacher.schedule=cosine
      logitcache train-teacher --resume            # after a kill or Ctrl-C
    """
    from logitcache.core.distributed import session
    from logitcache.teacher.train import train_teacher

    with session(params.teacher.device) as dist:
        metrics = train_teacher(params, resume=resume, dist=dist)
    if metrics:
        click.echo(f"teacher {params.teacher.model}: test accuracy {metrics['test_acc']:.4f} "
                   f"({metrics['train_seconds']:.0f} s) -> {params.teacher.out}")


@main.command("import-teacher")
@click.argument("weights", type=click.Path())
@params_options({"arch": "teacher.model", "out": "teacher.out", "device": "teacher.device",
                 "resize": "teacher.preprocess.resize", "crop": "teacher.preprocess.crop",
                 "interpolation": "teacher.preprocess.interpolation", "mean": "teacher.preprocess.mean",
                 "std": "teacher.preprocess.std"})
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Outputs of the file's head [default: the data's class count].")
@click.option("--class-map", type=click.Path(), default=None,
              help="JSON: data class (name or number) -> teacher output index; the logits are taken there.")
def import_teacher_cmd(params, weights, num_classes, class_map) -> None:
    """Make a teacher checkpoint from a local weight file (a torch state_dict or .safetensors); nothing is downloaded.

    --arch is a registry name, torchvision:NAME or timm:NAME; the preprocessing comes with the weights
    (torchvision's weights transforms, timm's pretrained_cfg) unless --resize/--crop/--mean/--std set it.
    Writes <out>/teacher.pt, which dump-teacher, inspect and train-student read as any teacher, and
    metrics.json with its validation accuracy. docs/teachers.md has the details.

    \b
    Example:
      logitcache import-teacher resnet18-f37072fd.pth --arch torchvision:resnet18 --num-classes 1000 --class-map classes.json
      logitcache import-teacher model.safetensors --arch timm:resnet50.a1_in1k --num-classes 1000 --class-map classes.json
      logitcache import-teacher teacher_state.pt --arch resnet8 --out data/imported
    """
    from logitcache.teacher.importer import import_teacher

    m = import_teacher(params, weights, num_classes=num_classes, class_map=class_map)
    score = f"validation accuracy {m['val_acc']:.4f}" if m.get("val_acc") is not None else m["scored"]
    click.echo(f"teacher {params.teacher.model} from {weights}: {score} -> {Path(params.teacher.out) / 'teacher.pt'}")


@main.command("dump-teacher")
@params_options({"teacher": "dump.teacher", "views": "dump.views", "layers": "dump.layers", "topk": "dump.topk",
                 "out": "dump.out", "device": "dump.device", "compression": "dump.compression"})
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing complete cache.")
def dump_teacher_cmd(params, overwrite) -> None:
    """Run the teacher once over every sample and view; write <out>/<split>.h5 (logits, features, views).

    A killed run resumes where it stopped when started again with the same arguments.
    Under torchrun every process dumps its shard of the samples and rank 0 merges them
    into the same <out>/<split>.h5.

    \b
    Example:
      logitcache dump-teacher --views 4 --layers layer2,layer3
      logitcache dump-teacher --views all --topk 5 --out data/cache_top5
      torchrun --nproc-per-node 4 -m logitcache dump-teacher    # one shard per process
    """
    from logitcache.core.distributed import session
    from logitcache.teacher.dump import dump_teacher

    if overwrite:
        params = params.model_copy(update={"dump": params.dump.model_copy(update={"overwrite": True})})
    with session(params.dump.device) as dist:
        paths = dump_teacher(params, dist)
    if dist.is_main:
        for path in paths:
            click.echo(f"wrote {path}")


@main.command("inspect")
@click.argument("cache", type=click.Path())
@click.option("--verify", is_flag=True, help="Recompute random rows with the teacher and compare.")
@click.option("--teacher", "teacher_path", default=None, help="Teacher checkpoint for --verify [default: dump.teacher].")
@click.option("--samples", default=64, show_default=True, help="Rows to recompute with --verify.")
@click.option("--atol", default=0.05, show_default=True,
              help="Largest allowed |logit difference| (and |topk_rest difference|) with --verify.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@params_options({})
def inspect_cmd(params, cache, verify, teacher_path, samples, atol, as_json) -> None:
    """Show what CACHE holds (teacher, data, views, layers, size); --verify rechecks it against the teacher.

    \b
    Example:
      logitcache inspect data/cache/train.h5
      logitcache inspect data/cache/train.h5 --verify --samples 128
    """
    import json

    from logitcache.cache.inspect import describe
    from logitcache.cache.inspect import verify as verify_cache

    info = describe(cache)
    if verify:
        info["verify"] = verify_cache(cache, teacher_path or params.dump.teacher, params.data, samples=samples, atol=atol)
    click.echo(json.dumps(info, indent=2) if as_json else _format_summary(info))


def _format_summary(info: dict) -> str:
    teacher, data, views = info["teacher"] or {}, info["dataset"] or {}, info["views"] or {}
    lines = [f"cache      {info['path']} ({'complete' if info['complete'] else 'INCOMPLETE'})",
             f"teacher    {teacher.get('model')} sha256 {str(teacher.get('checkpoint_sha256'))[:16]}, "
             f"{teacher.get('num_classes')} classes",
             f"data       {data.get('name')}/{data.get('split')}, N={info['samples']}, "
             f"fingerprint {str(data.get('fingerprint'))[:16]}",
             f"views      {views.get('count')} ({views.get('mode')}{', ' + views['kind'] if views.get('kind') else ''}), "
             f"evaluation view {views.get('eval_view')}",
             *([_topk_line(info)] if info.get("topk") else []),
             *([_source_line(teacher)] if teacher.get("source") else []),
             *([_preprocess_line(info["preprocess"])] if info.get("preprocess") else []),
             f"size       {info['bytes'] / 2**20:.1f} MiB, {info['bytes_per_sample'] or 0:.0f} bytes/sample, "
             f"{info['bytes_per_view'] or 0:.0f} bytes/view"]
    for name, spec in info["arrays"].items():
        lines.append(f"  {name:<28} {str(tuple(spec['shape'])):<22} {spec['dtype']:<8} {spec['bytes_per_sample']:>7,} B/sample")
    if info["forms"]:
        lines.append("layers     form        dataset                 shape per view   bytes/sample")
    for form in info["forms"]:
        setting = f"pooled to {form['pooled_to'] or 'whole'}" if form["form"] == "map" \
            else f"p={form['p']:g}" if form["form"] == "attention" else ""
        lines.append(f"  {form['layer']:<8} {form['form']:<11} {form['dataset']:<23} {str(tuple(form['shape'])):<16} "
                     f"{form['bytes_per_sample'] or 0:>12,}  {setting}".rstrip())
    if not info["teacher"]:
        lines[1] = "teacher    not recorded yet (the dump has not finished)"
    if info.get("teacher_accuracy"):
        lines.append(f"teacher accuracy from cached logits: {info['teacher_accuracy']}")
    if "verify" in info:
        v = info["verify"]
        kl = next(f"KL(T={key[4:]}) {value:.2e}" for key, value in v.items() if key.startswith("kl_t"))
        rest = f", max |Δ topk_rest| {v['max_abs_rest_diff']:.2e}" if "max_abs_rest_diff" in v else ""
        lines.append(f"verify     {v['rows']} rows: max |Δlogit| {v['max_abs_logit_diff']:.2e}{rest}, {kl}, "
                     f"cosine {v['cosine']} -> OK")
    return "\n".join(lines)


def _topk_line(info: dict) -> str:
    grid = info.get("topk_temperatures") or []
    return (f"top-k      {info['topk']} largest logits per view, right at temperatures "
            f"{', '.join(f'{t:g}' for t in grid) or 'none recorded'}")


def _source_line(teacher: dict) -> str:
    source, mapped = teacher["source"], teacher.get("class_map")
    return (f"imported   from {source['weights']} sha256 {source['sha256'][:16]}"
            + (f", logits at teacher outputs {mapped}" if mapped else ""))


def _preprocess_line(pre: dict) -> str:
    size = f"resize {pre['resize']}, crop {pre['crop']} ({pre['interpolation']})" if pre["resize"] else "as the data"
    return f"preprocess {size}, mean {pre['mean']} std {pre['std']}, {pre['channels']} channel(s) in"


def _method_names() -> list[str]:
    from logitcache.student.methods import methods

    return list(methods())


class LazyChoice(click.Choice):
    """Choices read from the method registry when the command runs, not when the CLI starts."""

    def __init__(self, names):
        self._names = names
        super().__init__([])

    @property
    def choices(self):
        return self._names()

    @choices.setter
    def choices(self, value):
        pass


@main.command("train-student")
@click.argument("name", default="default")
@params_options({})
@click.option("--method", "chosen", multiple=True, type=LazyChoice(_method_names),
              help="Train with these methods (repeatable) instead of the student's loss:, with their settings "
                   "from loss: when present, else their defaults. `logitcache methods` lists them.")
@click.option("--ce-only", is_flag=True, help="Train with cross-entropy alone (the baseline; no cache needed).")
@click.option("--online", is_flag=True, default=None, help="Reference mode: compute targets with the live teacher.")
@click.option("--resume", is_flag=True, help="Continue each seed's run from its resume.pt; finished seeds are kept.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train this many seeds at once, in processes sharing the CPU threads (same results as one by one).")
def train_student_cmd(params, name, chosen, ce_only, online, resume, jobs) -> None:
    """Train student NAME (a key of students: in params.yaml) against the teacher cache.

    Keys of students.NAME override the student defaults; -S students.NAME.key=value overrides one.

    \b
    Example:
      logitcache train-student kd
      logitcache train-student kd -S students.kd.loss.kd.temperature=8 -S students.kd.out=data/students/kd_t8
      logitcache train-student kd --method dkd          # same student, DKD instead of KD
      logitcache train-student kd --jobs 3              # its three seeds at once
      logitcache train-student --ce-only -S students.default.labeled_fraction=0.1
      torchrun --nproc-per-node 2 -m logitcache train-student kd     # DDP
    """
    from logitcache.core.distributed import session
    from logitcache.student.train import train_student

    student = params.student(name)
    updates = {"online": online} if online is not None else {}
    if chosen or ce_only:
        updates["loss"] = {} if ce_only else {m: student.loss.get(m) or {} for m in chosen}
    if updates:
        params = params.model_copy(update={"students": {**params.students, name: student.model_copy(update=updates)}})
    with session(params.student(name).device) as dist:
        m = train_student(params, name, resume=resume, dist=dist, jobs=jobs)
    if not m:
        return
    agreement = "" if m.get("agreement") is None else f", agreement {m['agreement']:.4f}"
    click.echo(f"student {name} ({m['mode']}): test accuracy {m['test_acc']:.4f}{agreement} -> {params.student(name).out}")


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print the methods as JSON.")
@click.option("--markdown", is_flag=True, help="Print the methods as the Markdown table of docs/methods.md.")
def methods_cmd(as_json, markdown) -> None:
    """List every distillation method: its family, what it reads from the cache, and its keys.

    \b
    Example:
      logitcache methods
      logitcache methods --json
      logitcache methods --markdown
    """
    import json

    from logitcache.student.methods import describe, markdown_table, methods

    info = [describe(cls) for cls in methods().values()]
    if markdown:
        click.echo(markdown_table(info), nl=False)
        return
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for m in info:
        click.echo(f"{m['name']:<9} {m['family']:<12} {m['description']} ({m['paper']})")
        click.echo(f"{'':<9} reads: {', '.join(m['reads']) or 'student outputs only'}")
        for key, spec in m["keys"].items():
            click.echo(f"{'':<11}{key} = {spec['default']!r}: {spec['description']}")


@main.command("evaluate")
@click.argument("checkpoint", type=click.Path())
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--test-cache", default=None, help="Test-split cache for agreement/KL [default: the run's].")
def evaluate_cmd(checkpoint, device, test_cache) -> None:
    """Compute a student checkpoint's test metrics (accuracy, agreement, KL, size, speed) without retraining.

    \b
    Example:
      logitcache evaluate data/students/kd/runs/seed0/student.pt
    """
    import json

    from logitcache.student.evaluate import evaluate_checkpoint

    click.echo(json.dumps(evaluate_checkpoint(checkpoint, device, test_cache), indent=2, sort_keys=True))


@main.command("summarize")
@click.option("--out", default="data/summary", show_default=True, help="Folder for metrics.json and summary.md.")
@params_options({})
def summarize_cmd(params, out) -> None:
    """Compare the teacher and every student of params.yaml: a metrics file and a Markdown table.

    \b
    Example:
      logitcache summarize && cat data/summary/summary.md
    """
    from logitcache.summary import summarize

    summarize(params, out)
    click.echo((Path(out) / "summary.md").read_text(), nl=False)


@main.command("params-doc")
def params_doc_cmd() -> None:
    """Print the Markdown reference of every params.yaml key (type, default, description), as docs/params.md holds it.

    \b
    Example:
      logitcache params-doc > docs/params.md
    """
    from logitcache.core.params_doc import render_params_doc

    click.echo(render_params_doc(), nl=False)


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--name", default="model", show_default=True, help="Write to <export.out>/NAME/.")
@params_options({"out": "export.out", "atol": "export.atol", "opset": "export.opset", "threads": "export.threads"})
def export_cmd(params, checkpoint, name) -> None:
    """Export CHECKPOINT as ONNX, a torch.export program (.pt2) and int8 ONNX; check and time each.

    The fp32 exports must match PyTorch's logits on the whole test split within export.atol;
    int8 is calibrated on replayed views of the training cache and its accuracy drop reported.
    Writes model.onnx, model.pt2, model.int8.onnx and metrics.json, all or nothing.

    \b
    Example:
      logitcache export data/students/kd/runs/seed0/student.pt --name kd
      logitcache export data/teacher/teacher.pt --name teacher --threads 1
    """
    from logitcache.core.runtimes import RUNTIMES
    from logitcache.deploy.export import export_checkpoint

    m = export_checkpoint(params, checkpoint, name)
    click.echo(f"{m['model']}, {m['params']:,} parameters, {m['threads']} thread(s), {m['test_images']} test images")
    for key in RUNTIMES:
        r = m[key]
        diff = f", max |Δlogit| {r['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in r else ""
        speed = (f", {r['latency_ms']:.3f} ms (p90 {r['latency_p90_ms']:.3f}) at batch 1, "
                 f"{r['throughput_img_s']:,.0f} img/s at 256" if "latency_ms" in r else "")
        click.echo(f"  {key:<10} {r['file']:<16} {r['bytes'] / 1024:8.1f} KiB  acc {100 * r['test_acc']:.2f} %{diff}{speed}")
    for key, spec in RUNTIMES.items():
        if spec.check == "compared":
            click.echo(f"{spec.label}: accuracy drop {100 * m[key]['acc_drop']:.2f} points")
    click.echo(f"int8 method: {m['int8_method']} -> {Path(params.export.out) / name}")


@main.command("prune")
@click.argument("checkpoint", type=click.Path())
@params_options({"ratio": "prune.ratio", "out": "prune.out"})
def prune_cmd(params, checkpoint) -> None:
    """Remove a fraction of every layer's channels (structured, torch-pruning); write a smaller checkpoint.

    Recover its accuracy by distilling from the cache: a student with init: set to the output.

    \b
    Example:
      logitcache prune data/teacher/teacher.pt --ratio 0.4 --out data/pruned/teacher.pt
      logitcache train-student pruned              # students.pruned in params.yaml, init: data/pruned/teacher.pt
    """
    from logitcache.deploy.prune import prune_checkpoint

    m = prune_checkpoint(params, checkpoint)
    click.echo(f"{m['model']}: {m['params_before']:,} -> {m['params']:,} parameters ({100 * m['params_kept']:.1f} %), "
               f"test accuracy {100 * m['test_acc_before']:.2f} -> {100 * m['test_acc']:.2f} % -> {params.prune.out}")


@main.command("models")
def models_cmd() -> None:
    """List every model name the registry builds (small-image families, students, torchvision), then the families
    that take a name of their own (torchvision:NAME as torchvision builds it, timm:NAME any timm model).

    \b
    Example:
      logitcache models | grep resnet
    """
    from logitcache.core.models import FAMILIES, list_models

    click.echo("\n".join(list_models() + [f"{family}:NAME" for family in FAMILIES]))


@main.command("layers")
@click.argument("model")
@click.option("--channels", default=1, show_default=True, help="Input channels of the data set.")
@click.option("--classes", default=10, show_default=True, help="Number of classes.")
def layers_cmd(model: str, channels: int, classes: int) -> None:
    """List MODEL's node names usable as feature layers (torchvision feature_extraction).

    \b
    Example:
      logitcache layers resnet20
    """
    from logitcache.core.models import UnknownModelError, build_model, feature_nodes

    try:
        net = build_model(model, channels, classes)
    except UnknownModelError as e:
        raise LogitcacheError(str(e)) from None
    click.echo("\n".join(feature_nodes(net)))


if __name__ == "__main__":
    main()
