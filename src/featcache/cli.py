"""The ``featcache`` command: parse arguments, call one library function, print.

Errors a user can cause print one line ``error: ...`` and exit with status 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import FeatcacheError, called_from, is_disk_full, write_error

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class State:
    def __init__(self, quiet: bool, debug: bool):
        self.quiet = False
        self.debug = debug
        if quiet:
            self.be_quiet()

    def be_quiet(self) -> None:
        """featcache's progress bars off (``progress=False`` to the library) and the libraries' too:
        transformers' "Loading weights" bar when a DETR folder loads, huggingface_hub's (the
        environment for one not imported yet, its switch for one that is)."""
        import os

        self.quiet = True
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def quiet_option(f):
    """``--quiet`` after the command too (``featcache extract ... -q``), not only before it."""

    def set_quiet(ctx, _param, value):
        if value:
            ctx.find_object(State).be_quiet()

    return click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=set_quiet,
                        help="No progress bars.")(f)


@click.group(context_settings=CONTEXT)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--deterministic", is_flag=True, envvar="FEATCACHE_DETERMINISTIC",
              help="Deterministic kernels: a resumed CUDA run repeats an uninterrupted one (slower; see ARCHITECTURE.md).")
@click.version_option(__version__, prog_name="featcache")
@click.pass_context
def cli(ctx, quiet, debug, deterministic):
    """featcache: run a frozen backbone once into a verifiable Zarr cache, then train heads from it.

    \b
    Start with `featcache demo`, or (the README's walkthrough has every step):
      featcache synth faces data/faces --n 288
      featcache extract --backbone clip --model small --pretrained none --manifest data/faces/manifest.csv --out caches/faces-small
      featcache cache info caches/faces-small
    """
    if deterministic:
        from .runtime import set_deterministic

        set_deterministic(True)
    ctx.obj = State(quiet, debug)


# -- demo ----------------------------------------------------------------------------------
@cli.command(context_settings=CONTEXT)
@click.option("--out", default="featcache-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the synthetic data and the cache.")
@click.option("--n", default=None, type=int, help="Number of synthetic face images [default: the demo's, DemoSizes.faces].")
@quiet_option
@click.pass_obj
def demo(state, out, n):
    """Run the main job offline on synthetic data (see the README for its time on a 2-core CPU).

    \b
    1 synthetic faces; 2 the MobileNetV4 filter (train, calibrate, evaluate);
    3 the filter's features cached (extract --backbone timm --model RUN);
    4 Stage 1 and the leakage audit on them; 5 a Stage-2 ablation on them, with intervals and
      per-subgroup rates (the result with signal);
    6 the pipeline check: offline CLIP `small` through Stage 1, Stage 2 and the cascade;
    7 audio: partial spoofs, XLS-R frames (offline `tiny`), the XAI head;
    8 detection fairness: the tiny DETR's query cache and FAAP.
    Rerunning resumes instead of recomputing.
    """
    from .demo import run_demo

    run_demo(out, n=n, progress=not state.quiet, echo=click.echo)


# -- synth ---------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT)
def synth():
    """Make synthetic datasets in real file formats."""


def synth_dataset(name: str):
    """A ``featcache synth NAME`` command: the OUT folder, ``--seed``, ``--overwrite`` and ``--quiet``,
    the options every synthetic dataset has; the command's own options come between."""

    def deco(f):
        for d in reversed((synth.command(name, context_settings=CONTEXT),
                           click.argument("out", type=click.Path(file_okay=False)),
                           click.option("--seed", default=0, show_default=True, help="Random seed (same bytes for a seed)."),
                           click.option("--overwrite", is_flag=True, help="Write into OUT even when it is not empty."),
                           quiet_option, click.pass_obj)):
            f = d(f)
        return f

    return deco


@synth_dataset("faces")
@click.option("--n", default=800, show_default=True, help="Number of face images (real and fake).")
@click.option("--bias", default=0.6, show_default=True,
              help="0 = equal artifact strength for all subgroups; 1 = forgeries of some subgroups much harder.")
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--workers", default=1, show_default=True, help="Processes drawing images (same bytes for any number).")
def synth_faces_cmd(state, out, n, seed, bias, size, workers, overwrite):
    """Procedural faces in 8 subgroups, imbalanced like FF++, with blended face-swap forgeries.

    Writes OUT/manifest.csv (detection) and OUT/stage1_manifest.csv (real faces with race and
    gender, for Stage 1).  Example: featcache synth faces data/faces --n 2000 --bias 0.8
    """
    from .data.manifest import refuse_non_empty
    from .data.synth_faces import synth_faces

    refuse_non_empty(out, overwrite=overwrite)
    summary = synth_faces(out, n=n, seed=seed, bias=bias, size=size, progress=not state.quiet, workers=workers)
    click.echo(json.dumps(summary, indent=2, default=str))


@synth_dataset("audio")
@click.option("--n", default=120, show_default=True, help="Number of utterances (bonafide, spoof, partial spoof).")
@click.option("--format", "fmt", type=click.Choice(["flac", "wav"]), default="flac", show_default=True)
@click.option("--min-seconds", default=1.0, show_default=True)
@click.option("--max-seconds", default=6.0, show_default=True)
def synth_audio_cmd(state, out, n, seed, fmt, min_seconds, max_seconds, overwrite):
    """Speech-like 16 kHz utterances, whole and partial vocoder-like spoofs, in real layouts.

    Writes OUT/manifest.csv (with `segments`), an ASVspoof-2019-LA tree and protocols, and a
    PartialSpoof tree with segment labels.  Example: featcache synth audio data/audio --n 200
    """
    from .data.manifest import refuse_non_empty
    from .data.synth_audio import synth_audio

    refuse_non_empty(out, overwrite=overwrite)
    summary = synth_audio(out, n=n, seed=seed, fmt=fmt, min_seconds=min_seconds, max_seconds=max_seconds,
                          progress=not state.quiet)
    click.echo(json.dumps(summary, indent=2, default=str))


@synth_dataset("features")
@click.option("--rows", default=10_000, show_default=True, help="Samples (real and fake; 4 per identity).")
@click.option("--dim", default=768, show_default=True, help="Feature dimension.")
@click.option("--bias", default=0.6, show_default=True,
              help="0 = fakes equally far from reals in every subgroup; 1 = the hard subgroups' fakes barely shifted.")
@click.option("--signal", default=2.0, show_default=True, help="Shift of a fake in noise standard deviations (d') "
              "in an easy subgroup.")
@click.option("--methods", default="shift", show_default=True,
              help="Comma-separated manipulation methods of the fakes (the method column; each its own direction): "
                   "three or more make a leave-one-manipulation-out protocol possible.")
@click.option("--no-demographics", is_flag=True,
              help="Gender and race unknown (subgroup -1), as in Celeb-DF or DFDC: a cross-dataset test set.")
def synth_features_cmd(state, out, rows, dim, bias, signal, seed, methods, no_demographics, overwrite):
    """A controlled feature cache: features whose forgery signal and subgroup bias are known.

    A fake is shifted by d' = signal * (1 - bias * hardness) noise standard deviations along one
    direction, with the synthetic faces' hardness per subgroup; train heads on it with no backbone.
    Example: featcache synth features caches/controlled --rows 6000 --dim 256 --bias 0.6
    """
    from .cache.synth import synth_feature_cache
    from .data.manifest import refuse_non_empty

    refuse_non_empty(out, overwrite=overwrite)
    summary = synth_feature_cache(out, rows=rows, dim=dim, bias=bias, signal=signal, seed=seed,
                                  methods=tuple(m.strip() for m in methods.split(",")),
                                  demographics=not no_demographics)
    click.echo(json.dumps(summary, indent=2, default=str))


# -- manifest ------------------------------------------------------------------------------
def _backbone_list() -> str:
    from .extract.registry import BACKBONES

    names = []
    for name in BACKBONES.names():
        presets = BACKBONES.get(name).presets  # declared by every backbone (Backbone.presets)
        names.append(f"{name} (offline presets: {', '.join(presets)})" if presets else name)
    return ", ".join(names)


def _detr_presets() -> str:
    from .extract.registry import BACKBONES

    return ", ".join(BACKBONES.get("detr").presets)


def _task_presets() -> str:
    from .config import presets_of
    from .heads.task import list_tasks

    return "; ".join(f"{t}: {', '.join(presets_of(t))}" for t in list_tasks())


def _adapter_list() -> str:
    from .data.adapters import list_adapters

    return ", ".join(list_adapters())


def _task_list() -> str:
    from .heads.task import list_tasks

    return ", ".join(list_tasks())


def _manifest_tasks() -> str:
    from .heads.task import get_task, list_tasks

    return ", ".join(t for t in list_tasks() if get_task(t).source == "manifest")


#: Placeholders in help texts, filled from the registries when a help is shown (so every
#: registered name is listed, and other commands do not import the adapters, heads or backbones).
HELP_LISTS = {"{formats}": _adapter_list, "{tasks}": _task_list, "{presets}": _task_presets,
              "{manifest_tasks}": _manifest_tasks,
              "{backbones}": _backbone_list, "{detr_presets}": _detr_presets}


def _fill_help(text: str | None) -> str | None:
    if not text:
        return text
    for key, names in HELP_LISTS.items():
        if key in text:
            text = text.replace(key, names())
    return text


class _RegistryHelpCommand(click.Command):
    """A command whose help (its text and its options') names ``{formats}``, ``{tasks}``,
    ``{presets}`` or ``{backbones}``: filled from the registries only when the help is shown."""

    def format_help(self, ctx, formatter):
        saved = self.help, [(p, getattr(p, "help", None)) for p in self.params]
        self.help = _fill_help(self.help)
        for p, text in saved[1]:
            if text:
                p.help = _fill_help(text)
        try:
            super().format_help(ctx, formatter)
        finally:
            self.help = saved[0]
            for p, text in saved[1]:
                if text:
                    p.help = text


class _TaskCommand(_RegistryHelpCommand):
    """A command taking TASK whose options include the registered tasks' own (``requires_runs``: a finished
    run, such as Stage 2's ``--stage1 RUN``; ``cli_options``: a setting's shortcut): made from the tasks'
    declarations (``featcache.heads.task.task_options``) when the command is first parsed or shown, and
    handed to the callback in ``task_options`` (name -> value, None when not given); made again when
    the registered tasks change (a plugin's task registered since)."""

    _task_params: tuple = ((), [])

    def _own(self) -> list:
        from .heads.task import list_tasks, task_options

        names = tuple(list_tasks())
        if self._task_params[0] != names:
            opts, taken = task_options(), {p.name for p in self.params} | {"task_options"}
            clash = next((o for o in opts if o.name in taken), None)
            if clash is not None:
                raise FeatcacheError(f"task option {clash.flag} ({', '.join(clash.tasks)}) is an option of featcache "
                                     f"{self.name} itself; a task's option needs a name of its own")
            self._task_params = names, [click.Option(
                [o.flag, o.name], default=None, expose_value=False, callback=_collect_task_option,
                metavar=None if o.choices else ("RUN" if o.key is None else "VALUE"),
                type=click.Choice(list(o.choices)) if o.choices else click.Path(file_okay=False) if o.key is None
                else str, help=f"{', '.join(o.tasks)}: {o.help}.") for o in opts]
        return self._task_params[1]

    def get_params(self, ctx):
        params = super().get_params(ctx)
        return [*self.params, *self._own(), *params[len(self.params):]]


def _collect_task_option(ctx, param, value):
    ctx.params.setdefault("task_options", {})[param.name] = value
    return value


class _ManifestGroup(click.Group):
    """``featcache manifest FORMAT ROOT -o OUT`` (a dataset adapter) and ``featcache manifest merge
    A.csv B.csv ... -o OUT``: a first word that is not a subcommand is a FORMAT, handed to the
    hidden ``build`` command, so the adapters keep their one-line form."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["build", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        saved = self.help
        self.help = _fill_help(self.help)
        try:
            super().format_help(ctx, formatter)
        finally:
            self.help = saved


@cli.group("manifest", cls=_ManifestGroup, context_settings=CONTEXT, subcommand_metavar="FORMAT ROOT -o OUT | merge ...")
def manifest():
    """Write the canonical manifest CSV of a dataset (FORMAT ROOT -o OUT), or merge manifests.

    FORMAT is one of: {formats}. The README lists the layouts each accepts; `featcache manifest
    FORMAT --help` lists the options. The summary gives rows per split x label x subgroup (x attack
    for audio), where the splits came from, and a note for everything skipped or any fallback.

    \b
    Examples:
      featcache manifest folder data/my_faces -o my_faces.csv
      featcache manifest ffpp /data/FaceForensics++ --annotations test_noise.csv -o ffpp.csv
      featcache manifest asvspoof21 /data/ASVspoof2021_LA_eval --subset eval -o la21.csv
      featcache manifest coco-gender /data/coco --annotations coco_gender.csv --gender-map Unsure=unknown -o coco.csv
      featcache manifest merge fairface.csv utkface.csv causalface.csv -o stage1.csv
    """


class _ManifestBuildCommand(_RegistryHelpCommand):
    def format_usage(self, ctx, formatter):  # the form users type, not the hidden command's name
        formatter.write_usage(ctx.parent.command_path, "FORMAT ROOT -o OUT [OPTIONS]")


@manifest.command("build", hidden=True, cls=_ManifestBuildCommand, context_settings=CONTEXT)
@click.argument("fmt", metavar="FORMAT")
@click.argument("root", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Manifest CSV to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing manifest (caches built from it become stale).")
@click.option("--annotations", type=click.Path(), default=None,
              help="ffpp: demographic CSV(s) (Image Path/img_path + Intersection/intersec_label or one-hot); "
              "dfdc: per-frame demographic CSV(s) (A-DFDC); fairface, aiface: the folder of its label CSVs; coco-gender: "
              "the gender CSV (image_id,gender or id,bb_gender).")
@click.option("--label-column", type=click.Choice(["Intersection", "intersec_label"]), default=None,
              help="ffpp: which 0..7 code column of the annotations [Intersection when present: the cleaner one].")
@click.option("--subset", default=None, help="asvspoof21: keep only this subset of the keys (eval, progress, ...).")
@click.option("--gender-map", default=None,
              help="coco-gender: extra gender values, e.g. Unsure=unknown (or a YAML file of value: male|female|unknown).")
@click.option("--val-fraction", default=0.1, show_default=True, help="Where the dataset has no val split.")
@click.option("--test-fraction", default=0.1, show_default=True, help="Where the dataset has no test split.")
@click.option("--seed", default=0, show_default=True, help="Seed of the identity-disjoint split.")
@click.option("--no-check-files", is_flag=True, help="Do not check that every file exists.")
@quiet_option
def manifest_build(fmt, root, out, overwrite, annotations, label_column, subset, gender_map, val_fraction,
                   test_fraction, seed, no_check_files):
    """Write the canonical manifest CSV of a dataset, then its summary.

    FORMAT is one of: {formats}. The README lists the layouts each accepts. The summary gives
    rows per split x label x subgroup (x attack for audio), where the splits came from, and a
    note for everything skipped or any fallback.

    \b
    Examples:
      featcache manifest folder data/my_faces -o my_faces.csv
      featcache manifest ffpp /data/FaceForensics++ --annotations test_noise.csv -o ffpp.csv
      featcache manifest asvspoof21 /data/ASVspoof2021_LA_eval --subset eval -o la21.csv
      featcache manifest coco-gender /data/coco --annotations coco_gender.csv --gender-map Unsure=unknown -o coco.csv
    """
    from .data.adapters import build_manifest, manifest_summary

    m = build_manifest(fmt, root, out, annotations=annotations, val_fraction=val_fraction,
                       test_fraction=test_fraction, seed=seed, check_files=not no_check_files, overwrite=overwrite,
                       label_column=label_column, subset=subset, gender_map=gender_map)
    click.echo(f"wrote {out}: {len(m.df)} rows")
    click.echo(manifest_summary(m))


@manifest.command("merge", context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="A.csv B.csv ...")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Merged manifest CSV to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing manifest (caches built from it become stale).")
@click.option("--no-check-files", is_flag=True, help="Do not check that every file exists.")
@quiet_option
def manifest_merge(inputs, out, overwrite, no_check_files):
    """Merge manifests into one: columns aligned, a `source` column, identities kept apart.

    Each input's rows get `source` = its file name without .csv; columns an input lacks are left
    empty (unknown); identities are prefixed with the source so two datasets never share a person;
    sample_ids found in several inputs are prefixed with their source; relative paths are
    resolved against each input's folder and written relative to OUT's folder (absolute outside
    it). Splits are kept. Refused: inputs of different kinds (images, audio, detection) and a file
    listed by two inputs.

    \b
    Example (the design's Stage-1 union):
      featcache manifest merge fairface.csv utkface.csv causalface.csv -o stage1.csv
    """
    from .data.adapters import manifest_summary
    from .data.manifest import merge_manifests

    m = merge_manifests(inputs, out, overwrite=overwrite, check_files=not no_check_files)
    click.echo(f"wrote {out}: {len(m.df)} rows from {len(inputs)} manifests")
    click.echo(manifest_summary(m))


@cli.command("frames", context_settings=CONTEXT)
@click.argument("video_root", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--fps", type=float, default=None, help="Frames per second of video to keep.")
@click.option("--every", type=int, default=None, help="Keep every K-th frame instead.")
@quiet_option
@click.pass_obj
def frames_cmd(state, video_root, out, fps, every):
    """Extract frames of every video under VIDEO_ROOT (PyAV) into the layout the adapters read.

    .../c23/videos/000.mp4 -> OUT/.../c23/frames/000/*.png (FF++); Celeb-real/id0_0000.mp4 ->
    OUT/Celeb-real/frames/id0_0000/*.png (Celeb-DF). Resumable: finished videos are skipped.
    Unreadable videos are listed in OUT/frames_failed.csv and retried on the next run.

    \b
    Example:
      featcache frames /data/FaceForensics++ /data/FaceForensics++ --fps 1
    """
    from .data.frames import extract_frames

    result = extract_frames(video_root, out, fps=fps, every=every, progress=not state.quiet)
    click.echo(result.summary())


# -- extract -------------------------------------------------------------------------------
@cli.command(cls=_RegistryHelpCommand, context_settings=CONTEXT)
@click.option("--backbone", required=True, help="One of: {backbones}.")
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder (created or resumed).")
@click.option("--model", default=None, help="Model name (clip: ViT-L-14 by default; xlsr: facebook/wav2vec2-xls-r-300m "
              "or a local HF folder; tiny, small offline; timm: any timm model name or a train-e2e run folder).")
@click.option("--pretrained", default=None, help="Weights: a tag (clip: openai; xlsr: hf; timm: its default tag), a "
              "local file (xlsr: a detector checkpoint with ssl_model.* fairseq names), or none.")
@click.option("--layer", default=None, help="Which output to cache (xlsr: final, or a hidden-state index).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--num-workers", default=None, type=int, help="DataLoader decoding workers [cores per process on the node - 1, at most 16].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda when present].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Compute precision; features are stored as fp16.")
@click.option("--part-rows", default=4096, show_default=True, help="Samples per cache part (the unit of resume).")
@click.option("--on-error", type=click.Choice(["skip", "raise"]), default="skip", show_default=True,
              help="skip: record unreadable samples in errors.jsonl; raise: stop at the first.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made by another extraction.")
@click.option("--seed", default=0, show_default=True, help="Seed of randomly initialised weights.")
@click.option("--max-seconds", default=None, type=float, help="Audio: cut utterances after this many seconds.")
@click.option("--decode", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="clip: gpu decodes JPEGs on the GPU (torchvision.io.decode_jpeg); other files stay on the CPU.")
@click.option("--compile", "compile_model", is_flag=True, help="Run the model through torch.compile.")
@quiet_option
@click.pass_obj
def extract(state, backbone, manifest_path, out, model, pretrained, layer, batch_size, num_workers, device,
            precision, part_rows, on_error, overwrite, seed, max_seconds, decode, compile_model):
    """Run a frozen backbone over a manifest into a cache.

    BACKBONE is one of: {backbones}. An offline preset (--model tiny, small) has seeded random
    weights and needs no network. Rerun the same command to resume: only missing parts are
    computed. Under torchrun the processes share the parts (one GPU each): see the README.

    \b
    Examples:
      featcache extract --backbone clip --manifest data/faces/manifest.csv --out caches/faces-clip
      featcache extract --backbone clip --model small --pretrained none --manifest data/faces/manifest.csv \\
          --out caches/faces-small
      featcache extract --backbone xlsr --model tiny --manifest data/audio/manifest.csv --out caches/audio-tiny
      featcache extract --backbone timm --model runs/mnv4-small --manifest data/faces/manifest.csv --out caches/mnv4
    """
    from .extract import extract as run_extract

    try:
        r = run_extract(backbone, manifest_path, out, model=model, pretrained=pretrained, layer=layer,
                        batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                        part_rows=part_rows, on_error=on_error, overwrite=overwrite, seed=seed,
                        max_seconds=max_seconds, decode=decode, compile=compile_model, progress=not state.quiet)
    except KeyboardInterrupt:
        click.echo(f"interrupted; rerun the same command to resume {out}", err=True)
        sys.exit(130)
    if r.rank != 0:  # under torchrun, rank 0 reports for the run
        return
    resumed = f", {r.parts_resumed} already there" if r.parts_resumed else ""
    if r.parts_repaired:
        resumed += f", {r.parts_repaired} found damaged and redone"
    if r.meta_repaired:
        resumed += f", meta column{'s' * (len(r.meta_repaired) > 1)} {', '.join(r.meta_repaired)} written again"
    click.echo(f"{r.cache}: {r.rows} samples in {r.parts_total} parts ({r.parts_written} written{resumed}), "
               f"{r.failed} unreadable, {r.seconds:.1f} s"
               + (f", {r.samples_per_second:.1f} samples/s" if r.samples_per_second else ""))
    for f in r.failures[:5]:
        click.echo(f"  skipped {f['sample_id']}: {f['error']}")
    if r.failed > 5:
        click.echo(f"  ... see {r.cache}/errors.jsonl")


# -- heads ---------------------------------------------------------------------------------
def _evals(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected NAME=CACHE, e.g. celebdf=caches/celebdf", param_hint="--eval")
        name, path = item.split("=", 1)
        out[name.strip()] = path.strip()
    return out


@cli.command("train-head", cls=_TaskCommand, context_settings=CONTEXT)
@click.argument("task")
@click.option("--cache", "cache_path", default=None, type=click.Path(), help="Cache to train from (the heads).")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(dir_okay=False),
              help="Manifest to train from (the tasks that read images: {manifest_tasks}).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--preset", default=None, help="A preset of the task's config (the first listed is the default): {presets}.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="YAML overrides.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one key, e.g. training.epochs=5.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--tensorboard", is_flag=True, help="Also log the per-epoch scalars to RUN/tensorboard/ "
              "(logging.tensorboard; needs pip install 'featcache[tensorboard]').")
@click.option("--keep-resume", is_flag=True, help="Keep the finished run's resume point (resume.pt, about 1.5x its "
              "weight files); by default it is pruned when the run finishes (extending a run needs it).")
@quiet_option
@click.pass_obj
def train_head_cmd(state, task, cache_path, manifest_path, out, preset, config_file, sets, overwrite, tensorboard,
                   keep_resume, task_options=None):
    """Train a task from its data into a run directory; rerun the same command to resume it.

    TASK is one of: {tasks}. The heads read a cache (--cache); mnv4 (the MobileNetV4 filter) and
    detr (the DETR fine-tune) read images from a manifest (--manifest). Presets per task: {presets}.
    A task's own options (a run it needs, a setting's shortcut) are listed with the tasks that take
    them. The README's walkthrough makes every cache named below.

    \b
    Examples:
      featcache train-head stage1 --cache caches/stage1-small --out runs/stage1
      featcache train-head stage2 --cache caches/faces-small --stage1 runs/stage1 --preset cvar --out runs/s2-cvar
      featcache train-head stage2 --cache caches/faces-small --stage1 runs/stage1 --set model.num_ca_views=0 \\
          --out runs/s2-adain-only
      featcache train-head xai --cache caches/audio-tiny --prototype-mode ema --out runs/xai
      featcache train-head faap --cache caches/detr-fit --preset bidirectional --out runs/faap-bi
      featcache train-head mnv4 --manifest data/faces/manifest.csv --out runs/mnv4-small \\
          --set model.name=mobilenetv4_conv_small --set model.pretrained=none --set model.image_size=64
      featcache train-head detr --manifest data/det/manifest.csv --out models/detr-tiny-det
    """
    from .heads.task import choose_source, task_option_values
    from .train import train_head

    runs, task_sets = task_option_values(task, task_options or {})  # a shortcut is a --set item
    sets = (*sets, *task_sets)
    if tensorboard:
        sets = (*sets, "logging.tensorboard=true")
    source = choose_source(task, cache_path, manifest_path)
    r = train_head(task, source, out, preset=preset, config_file=config_file, sets=sets, overwrite=overwrite,
                   progress=not state.quiet, options=runs, echo=click.echo, keep_resume=keep_resume)
    _print_run(r)


def _print_run(r) -> None:
    for line in r.lines():
        click.echo(line)
    _print_remarks_and_legend(r.evaluations)


def _print_remarks_and_legend(evaluations) -> None:
    """Each evaluation's remarks (degenerate detector, NaN metrics and why), then the meaning of
    the printed metrics once."""
    for e in evaluations:
        for remark in e.remarks:
            click.echo(f"  remark ({e.split}): {remark}")
    if evaluations:
        click.echo(evaluations[-1].legend().rstrip())


@cli.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--cache", "cache_path", default=None, type=click.Path(), help="Another cache [the run's own].")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(dir_okay=False),
              help="mnv4 and detr runs: another manifest of images [the one trained on].")
@click.option("--split", default="test", show_default=True)
@click.option("--name", default=None,
              help="Tag of the output folder RUN/eval/<name>_<split> [another cache: its folder name].")
@click.option("--overwrite", is_flag=True, help="Replace an evaluation of other inputs under the same name.")
@click.option("--thresholds", default=None,
              help="mnv4 runs: cascade thresholds (stop as real when 1 - P(fake) >= t) [the run's "
                   "evaluation.thresholds: 0.9,0.95,0.98,0.99].")
@click.option("--plots/--no-plots", default=None,
              help="Draw this evaluation's plots or not [the run's logging.plots: a run trained with "
                   "logging.plots=false gets its plots with --plots].")
@quiet_option
@click.pass_obj
def evaluate(state, run, cache_path, manifest_path, split, name, overwrite, thresholds, plots):
    """Evaluate a run of any task on a split: predictions, metrics, subgroup table, plots.

    The run's own data (its cache, or its manifest for mnv4 and detr runs) goes to RUN/eval/<split>/;
    other data to RUN/eval/<name>_<split>/ (--name, or the cache's folder / manifest's file name),
    with the detection metrics and their intervals, and the fairness metrics where the test set
    has demographics (a detr run: COCO AP, AP50, AR per gender). metrics.json records the run, the
    cache (path and fingerprint), the split, the thresholds, the featcache version and this command.

    \b
    Examples:
      featcache evaluate runs/s2-cvar
      featcache evaluate runs/s2-cvar --cache caches/celebdf-clip --name celebdf
      featcache evaluate runs/mnv4-small --manifest data/faces/manifest.csv --thresholds 0.9,0.98
    """
    from .e2e.evaluate import evaluate_run

    e = evaluate_run(run, cache_path, split=split, name=name, manifest=manifest_path,
                     thresholds=None if thresholds is None else _floats(thresholds, "--thresholds"),
                     plots=plots, progress=not state.quiet, overwrite=overwrite,
                     command=_command_line(click.get_current_context()))
    _print_evaluation(e, run)


def _print_evaluation(e, what) -> None:
    click.echo(f"{what}: {e.split}: {e.short()}")
    for line in e.details():
        click.echo(f"  {line}")
    _print_remarks_and_legend([e])
    click.echo(f"  wrote {e.out}/: {', '.join(e.files)}")


def _command_line(ctx) -> str:
    """The command as typed, rebuilt from its parsed parameters (for metrics.json's provenance)."""
    import shlex

    words = ctx.command_path.split()
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if isinstance(p, click.Argument):
            words += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]
        elif p.is_flag and value is False and p.secondary_opts and value != p.default:
            words.append(max(p.secondary_opts, key=len))  # --no-plots
        elif p.expose_value and value not in (None, False, ()) and value != p.default:
            flag = max(p.opts, key=len)
            words += [flag] if p.is_flag else [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


@cli.command("score", context_settings=CONTEXT)
@click.argument("predictions", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the evaluation into.")
@click.option("--name", default=None, help="The detector's name in the report's title [the CSV's file name].")
@click.option("--val", "val_path", default=None, type=click.Path(dir_okay=False),
              help="The detector's validation predictions (same columns): the threshold chosen on val.")
@click.option("--threshold", default=None, metavar="RULE",
              help="Rule of the val-chosen threshold: val_eer (default), val_fpr=<x> or 0.5 (none).")
@click.option("--overwrite", is_flag=True, help="Replace an evaluation of other predictions in --out.")
@quiet_option
@click.pass_obj
def score_cmd(state, predictions, out, name, val_path, threshold, overwrite):
    """Evaluate any detector's predictions CSV as `featcache evaluate` evaluates a run.

    PREDICTIONS.csv has one row per test sample: label (0 real, 1 fake), prob (P(fake)), optional
    identity (whole identities are resampled for the intervals) and optional demographics:
    subgroup (codes 0..7; PG-FDD's intersec_label) or race and gender. OUT gets predictions.csv,
    metrics.json, report.md, subgroups.csv and plots/.

    \b
    Examples:
      featcache score pgfdd_test.csv --out scores/pgfdd --val pgfdd_val.csv
      featcache score runs/s2-cvar/eval/test/predictions.csv --out scores/s2-cvar \\
          --val runs/s2-cvar/eval/val/predictions.csv
    """
    from .train.score import score_predictions

    e = score_predictions(predictions, out, name=name, val=val_path, threshold=threshold, overwrite=overwrite,
                          command=_command_line(click.get_current_context()))
    _print_evaluation(e, predictions)


@cli.command(cls=_TaskCommand, context_settings=CONTEXT)
@click.argument("task")
@click.option("--cache", "cache_path", default=None, type=click.Path(), help="The heads' cache.")
@click.option("--manifest", "manifest_path", default=None, type=click.Path(dir_okay=False),
              help="The manifest of the tasks that read images ({manifest_tasks}).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--presets", default="all", show_default=True, help="Comma-separated presets, or all: {presets}.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--eval", "evals", multiple=True, metavar="NAME=CACHE",
              help="Also evaluate each run on this cache's test split (checked before training: finished, same "
                   "backbone, labelled); writes the cross-dataset table cross_dataset.{csv,md,png}.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override for every run.")
@click.option("--baseline", default=None, metavar="PRESET",
              help="Also table each preset's paired difference to this preset (always to none when present).")
@click.option("--devices", default=None, metavar="DEV,DEV",
              help="Devices to spread the run groups over, e.g. cuda:0,cuda:1 [every visible GPU, else cpu].")
@click.option("--shard", default=None, metavar="I/N",
              help="Train only share I of N (0 <= I < N), e.g. under SLURM "
                   "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; then run once with --collect.")
@click.option("--collect", is_flag=True, help="Train nothing: write the tables from the finished runs.")
@click.option("--overwrite", is_flag=True, help="Retrain finished runs too.")
@click.option("--protocol", type=click.Choice(["standard", "lomo"]), default="standard", show_default=True,
              help="lomo: leave one manipulation method out (the cache's method column): per method, train on the "
                   "others (reals shared), test on its fakes and the test reals; writes lomo.{csv,md,png}.")
@click.option("--keep-resume", is_flag=True, help="Keep each finished run's resume point (pruned by default; "
              "the disk estimate printed before training says how much it takes).")
@quiet_option
@click.pass_obj
def ablate(state, task, cache_path, manifest_path, out, presets, seeds, evals, sets, baseline, devices, shard,
           collect, overwrite, protocol, keep_resume, task_options=None):
    """Train every preset x seed, runs that share an architecture stacked as one job; write
    ablation.csv, ablation.json, ablation.md and a plot. Reuses finished runs; redoes half-written ones.

    TASK is one of: {tasks}. A task's own options (a run it needs, a setting's shortcut) are listed
    with the tasks that take them.

    \b
    Examples:
      featcache ablate stage2 --cache caches/faces-small --stage1 runs/stage1 --presets all --seeds 0,1,2 \\
          --eval other=caches/other-small --out ablations/stage2
      featcache ablate stage1 --cache caches/stage1-small --seeds 0,1,2 --out ablations/stage1
      featcache ablate mnv4 --manifest data/faces/manifest.csv --presets design,timm --seeds 0,1 \\
          --set model.name=mobilenetv4_conv_small --set model.pretrained=none --out ablations/mnv4
      featcache ablate stage2 --cache caches/faces-small --stage1 runs/stage1 --presets none,full \\
          --protocol lomo --out ablations/stage2-lomo
      # SLURM: sbatch --array=0-3 ... featcache ablate ... --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
      #        then once: featcache ablate ... --collect
    """
    from .heads.task import choose_source, task_option_values
    from .train import ablate as run_ablate

    runs, task_sets = task_option_values(task, task_options or {})
    source = choose_source(task, cache_path, manifest_path)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: expected integers like 0,1,2", param_hint="--seeds") from None
    if not seed_list:
        raise click.BadParameter(f"{seeds!r}: expected integers like 0,1,2", param_hint="--seeds")
    preset_list = "all" if presets == "all" else [p.strip() for p in presets.split(",") if p.strip()]
    device_list = None if devices is None else [d.strip() for d in devices.split(",") if d.strip()]
    result = run_ablate(task, source, out, presets=preset_list, seeds=seed_list, evals=_evals(evals), sets=(*sets, *task_sets),
                        options=runs, baseline=baseline, devices=device_list, shard=shard,
                        collect=collect, overwrite=overwrite, progress=not state.quiet, echo=click.echo,
                        protocol=protocol, keep_resume=keep_resume)
    click.echo(result.markdown)
    if result.files:
        click.echo(f"wrote {out}/: {', '.join(result.files)}")


# -- the fast filter (end-to-end MobileNetV4), calibration, cascade ----------------------------
def _floats(text: str, hint: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected numbers like 0.9,0.98", param_hint=hint) from None


def _e2e_default(name: str):
    """A ``train-e2e mnv4`` option's default, read from ``featcache.e2e.mnv4.DEFAULTS`` (configs/mnv4.yaml) when the
    command runs (importing it at start-up would load torch for every command); the values shown
    in ``--help`` are pinned to DEFAULTS by a test."""

    def value():
        from .e2e.mnv4 import DEFAULTS

        return DEFAULTS[name]

    return value


@cli.group("train-e2e", context_settings=CONTEXT)
def train_e2e_group():
    """Train a model end to end on pixels (the cascade's fast filter): an alias of `train-head mnv4`."""


@train_e2e_group.command("mnv4", context_settings=CONTEXT)
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--model", default="mobilenetv4_hybrid_medium", show_default=True, help="timm model name.")
@click.option("--pretrained", default=None,
              help="timm tag [ix_e550_r256_in1k for the default model], a weights file, or none (random).")
@click.option("--epochs", default=None, type=int,
              help="[50, the design's length]; with --resume: extend the finished run to this many.")
@click.option("--batch-size", default=_e2e_default("batch_size"), type=int, show_default="32")
@click.option("--lr", default=None, type=float,
              help="[1e-4]; with --resume and a larger --epochs: restart the schedule from this lr "
                   "[the last lr used].")
@click.option("--weight-decay", default=_e2e_default("weight_decay"), type=float, show_default="1e-05")
@click.option("--save-every", default=0, show_default=True, help="Keep a weights snapshot every N epochs (0: none).")
@click.option("--patience", default=_e2e_default("patience"), type=int, show_default="15, the design's example",
              help="Early stopping on val AUC (0: off).")
@click.option("--mixed-precision/--no-mixed-precision", default=False, show_default="off: fp32, the design's",
              help="torch.autocast (+ GradScaler for fp16) on CUDA; the CPU always trains in fp32.")
@click.option("--amp-dtype", type=click.Choice(["fp16", "bf16"]), default=_e2e_default("amp_dtype"),
              show_default="fp16")
@click.option("--no-augment", is_flag=True, help="Train without flip, colour jitter, affine and blur.")
@click.option("--image-size", default=_e2e_default("image_size"), type=int, show_default="256")
@click.option("--geometry", type=click.Choice(["design", "timm"]), default=_e2e_default("geometry"),
              show_default="design",
              help="design: the image resized to --image-size square (a face of that size as it is); "
                   "timm: timm's evaluation resize to size / crop_pct and centre crop.")
@click.option("--num-workers", default=0, show_default=True,
              help="Persistent DataLoader workers that decode and resize to uint8 (0: in this process).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda when present].")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out with its own config (rerunning the same "
              "command resumes too); with a larger --epochs, extend the finished run.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--tensorboard", is_flag=True, help="Also log the per-epoch scalars to OUT/tensorboard/ "
              "(needs pip install 'featcache[tensorboard]').")
@quiet_option
@click.pass_obj
def train_e2e_mnv4(state, manifest_path, out, model, pretrained, epochs, batch_size, lr, weight_decay, save_every,
                   patience, mixed_precision, amp_dtype, no_augment, image_size, geometry, num_workers, device, seed, resume,
                   overwrite, tensorboard):
    """Fine-tune MobileNetV4 (one logit, BCE, AdamW, cosine) as the cascade's fast filter.

    An alias of `featcache train-head mnv4 --manifest M --out RUN`: each option sets one key of
    configs/mnv4.yaml (--epochs: training.epochs, --image-size: model.image_size, ...). An
    interrupted run resumes when the same command is run again.

    \b
    Examples:
      featcache train-e2e mnv4 --manifest ffpp.csv --out runs/mnv4 --num-workers 8
      featcache train-e2e mnv4 --manifest data/faces/manifest.csv --out runs/mnv4-small \\
          --model mobilenetv4_conv_small --pretrained none --image-size 64 --epochs 8 --lr 1e-3
      featcache train-e2e mnv4 --manifest ffpp.csv --out runs/mnv4 --resume --epochs 60
    """
    from .e2e import train_e2e

    try:
        r = train_e2e(manifest_path, out, model=model, pretrained=pretrained, epochs=epochs, batch_size=batch_size,
                      lr=lr, weight_decay=weight_decay, save_every=save_every, patience=patience,
                      mixed_precision=mixed_precision, amp_dtype=amp_dtype, augment=not no_augment,
                      image_size=image_size, geometry=geometry,
                      num_workers=num_workers, device=device, seed=seed, resume=resume, overwrite=overwrite,
                      tensorboard=tensorboard, progress=not state.quiet, echo=click.echo)
    except KeyboardInterrupt:
        click.echo("interrupted; run the same command again to continue from the last finished epoch", err=True)
        sys.exit(130)
    _print_run(r)


@cli.command(context_settings=CONTEXT)
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False))
@click.option("--split", default="val", show_default=True, help="Split the temperature is fitted on.")
@click.option("--val-split", type=float, default=None,
              help="Where the manifest has no --split rows: hold out this fraction of train's identities "
                   "(e.g. 0.2; seeded, identity-disjoint) and fit on them.")
@click.option("--seed", default=0, show_default=True, help="Seed of the --val-split hold-out.")
@click.option("--objective", type=click.Choice(["nll", "ece"]), default="nll", show_default=True)
@click.option("--device", default=None)
@quiet_option
@click.pass_obj
def calibrate(state, run, manifest_path, split, val_split, seed, objective, device):
    """Fit the filter's temperature (p = sigmoid(logit / T), L-BFGS-B in [0.1, 10]).

    Writes calibration_temp.json, calibration_metrics.json, plots/reliability_diagram.png and
    calibrated_predictions.csv into RUN; evaluate and cascade then use T.

    \b
    Examples:
      featcache calibrate runs/mnv4-small --manifest data/faces/manifest.csv --objective nll
      featcache calibrate runs/mnv4 --manifest my_no_val.csv --val-split 0.2
    """
    from .e2e import calibrate_run

    r = calibrate_run(run, manifest_path, split=split, objective=objective, val_split=val_split, seed=seed,
                      device=device, progress=not state.quiet)
    click.echo(f"{run}: T = {r['temperature']:.4f} (fitted on {r['split']}, n = {r['n']}, {objective})")
    for k in ("ece", "mce", "brier", "nll"):
        click.echo(f"  {k:5s} {r['before'][k]:.4f} -> {r['after'][k]:.4f}")
    for line in r["messages"]:
        click.echo(line)


@cli.command(context_settings=CONTEXT)
@click.option("--filter", "filter_run", required=True, type=click.Path(file_okay=False), help="A train-e2e run.")
@click.option("--detector", "detector_run", required=True, type=click.Path(file_okay=False),
              help="A Stage-2 run (train-head stage2).")
@click.option("--cache", "cache_path", required=True, type=click.Path(), help="The detector's cache of the manifest.")
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--max-leakage", default=0.05, show_default=True, help="Budget of fakes the filter may stop.")
@click.option("--thresholds", default="0.9,0.95,0.98,0.99", show_default=True,
              help="Thresholds added to the grid 0.50..0.99, 0.995, 0.999.")
@click.option("--device", default=None)
@quiet_option
@click.pass_obj
def cascade(state, filter_run, detector_run, cache_path, manifest_path, out, max_leakage, thresholds, device):
    """Put the filter in front of a Stage-2 detector: AUC, leakage, filtration, compute per threshold.

    The recommended threshold is chosen on val (most filtration within --max-leakage) and
    reported on test. Writes cascade_report.json, cascade_thresholds.csv, cascade_tradeoff.png.

    \b
    Example:
      featcache cascade --filter runs/mnv4-small --detector runs/s2-full --cache caches/faces-small \\
          --manifest data/faces/manifest.csv --out runs/cascade --max-leakage 0.05
    """
    from .e2e import run_cascade

    r = run_cascade(filter_run, detector_run, cache_path, manifest_path, out, max_leakage=max_leakage,
                    thresholds=_floats(thresholds, "--thresholds"), device=device, progress=not state.quiet)
    lat = r["latency"]
    click.echo(f"latency per sample ({lat['device']}): filter {lat['filter_ms']:.2f} ms, detector "
               f"{lat['detector_ms']:.2f} ms (backbone {lat['backbone_ms']:.2f} + head {lat['head_ms']:.3f})")
    click.echo(f"detector alone on test: auc {r['alone_test']['detector']['auc']:.3f}")
    rec = r["recommended"]
    if rec is not None:
        t = rec["test"]
        click.echo(f"recommended t = {rec['threshold']:g} (val leakage {rec['val']['leakage']:.3f}); on test: "
                   f"filtration {t['filtration']:.3f}, leakage {t['leakage']:.3f}, sent to detector "
                   f"{t['coverage']:.3f}, auc {t['auc']:.3f}, compute saved {t['compute_saved']:.3f}")
    for line in r["messages"]:  # how the manifest matched the cache, rows used, remarks
        click.echo(line)
    click.echo(f"wrote {out}/cascade_report.json, cascade_thresholds.csv, cascade_tradeoff.png")


# -- analyze -------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT)
def analyze():
    """Analyses of cached embeddings: subgroup leakage, neighbours, duplicates, maps, XAI prototypes.

    The neighbour searches use FAISS (exact, or IVF at scale; GPU when present).
    """


@analyze.command("subgroups", context_settings=CONTEXT)
@click.option("--cache", "cache_path", required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the JSON, markdown and plot.")
@click.option("--adapter", default=None, type=click.Path(file_okay=False),
              help="A Stage-1 run: audit the features before and after its debiasing adapter.")
@click.option("--train-split", default="train", show_default=True, help="Split the index and probes are fitted on.")
@click.option("--val-split", default="val", show_default=True, help="Split the kNN classifier and probes are scored on.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier audit in --out.")
@quiet_option
@click.pass_obj
def analyze_subgroups(state, cache_path, out, adapter, train_split, val_split, overwrite):
    """Audit how much race, gender, subgroup and label the features carry.

    kNN label purity (k = 10, 20, 50), a similarity-weighted kNN classifier and a linear probe,
    against the chance level; with --adapter, before and after the Stage-1 adapter.

    \b
    Examples:
      featcache analyze subgroups --cache caches/stage1-small --out audits/raw
      featcache analyze subgroups --cache caches/stage1-small --adapter runs/stage1 --out audits/stage1
    """
    from .analyze.subgroups import audit_subgroups

    audit_subgroups(cache_path, out, adapter_run=adapter, split_train=train_split, split_val=val_split,
                    progress=not state.quiet, overwrite=overwrite)
    click.echo((Path(out) / "subgroups.md").read_text())
    click.echo(f"wrote {out}/subgroups.json, subgroups.md, subgroups.png")


@analyze.command("neighbors", context_settings=CONTEXT)
@click.option("--cache", "cache_path", required=True, type=click.Path())
@click.option("--query", default=None, help="A sample_id of the cache.")
@click.option("--image", default=None, type=click.Path(dir_okay=False),
              help="An image file, embedded with the cache's own backbone and preprocessing.")
@click.option("-k", "k", default=10, show_default=True)
@quiet_option
def analyze_neighbors(cache_path, query, image, k):
    """Show the nearest samples of a cached sample or of an image.

    \b
    Examples:
      featcache analyze neighbors --cache caches/faces-small --query sf00123
      featcache analyze neighbors --cache caches/faces-small --image my_face.png -k 5
    """
    from .analyze.neighbors import nearest_samples
    from .report.tables import markdown_table

    if (query is None) == (image is None):
        raise click.UsageError("give exactly one of --query SAMPLE_ID or --image PATH")
    table = nearest_samples(cache_path, query=query, image=image, k=k)
    click.echo(markdown_table(table, ".4f"))


@analyze.command("duplicates", context_settings=CONTEXT)
@click.option("--cache", "cache_path", required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--threshold", default=0.95, show_default=True, help="Cosine similarity of a near-duplicate pair.")
@click.option("-k", "k", default=10, show_default=True, help="Neighbours examined per sample.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier report in --out.")
@quiet_option
def analyze_duplicates(cache_path, out, threshold, k, overwrite):
    """Find near-duplicate pairs and leaky splits.

    Leaky: near-duplicates, or shared identities, across train/val/test.

    Example: featcache analyze duplicates --cache caches/faces-small --threshold 0.97 --out audits/dups
    """
    from .analyze.duplicates import find_duplicates

    find_duplicates(cache_path, out, threshold=threshold, k=k, overwrite=overwrite)
    click.echo((Path(out) / "duplicates.md").read_text())


@analyze.command("map", context_settings=CONTEXT)
@click.option("--cache", "cache_path", required=True, type=click.Path())
@click.option("--color-by", type=click.Choice(["subgroup", "label", "dataset", "split"]), default="subgroup",
              show_default=True)
@click.option("--method", type=click.Choice(["auto", "pca", "umap"]), default="auto", show_default=True,
              help="auto: UMAP when umap-learn is installed, else PCA.")
@click.option("--split", default=None, help="Only this split.")
@click.option("--out", required=True, type=click.Path(), help="Image file to write (.png, .pdf, .svg, ...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing image.")
@quiet_option
def analyze_map(cache_path, color_by, method, split, out, overwrite):
    """Draw a 2-D map of the cached embeddings (PCA, or UMAP).

    Example: featcache analyze map --cache caches/faces-small --color-by subgroup --out maps/faces-small.png
    """
    from .analyze.maps import embedding_map

    info = embedding_map(cache_path, out, color_by=color_by, split=split, method=method, overwrite=overwrite)
    click.echo(f"wrote {out} ({info['method']}, {info['points']} points)")


@analyze.command("prototypes", context_settings=CONTEXT)
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--cache", "cache_path", default=None, type=click.Path(), help="A frames cache [the run's own].")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder [RUN/prototypes].")
@click.option("--split", default=None, help="Only this split [all].")
@click.option("--top", default=10, show_default=True, help="Nearest frames listed per prototype.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier report in the output folder.")
@quiet_option
def analyze_prototypes_cmd(run, cache_path, out, split, top, overwrite):
    """Nearest frames of an xai run's prototypes, label purity at k = 10, 50, 100, and a PCA map.

    Example: featcache analyze prototypes runs/xai --cache caches/audio-tiny
    """
    from .analyze.prototypes import analyze_prototypes

    report = analyze_prototypes(run, cache_path, out, split=split, top=top, overwrite=overwrite)
    folder = Path(out) if out else Path(run) / "prototypes"
    click.echo((folder / "prototypes.md").read_text())
    click.echo(f"wrote {folder}/prototypes.json, prototypes.md, prototypes_map.png "
               f"(prototype distance {report['prototype_distance']:.3f})")


# -- cache ---------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT)
def cache():
    """Inspect, verify and export a cache."""


@cache.command("info", context_settings=CONTEXT)
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@quiet_option
def cache_info_cmd(path, as_json):
    """Show rows, dimension, parts, fingerprint, backbone, size.

    Example: featcache cache info caches/faces-small
    """
    from .cache import cache_info, format_info

    info = cache_info(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))


@cache.command("verify", context_settings=CONTEXT)
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@quiet_option
def cache_verify_cmd(path, as_json):
    """Check every array of every part and every meta column; exit 1 if damaged.

    Each array present, complete (its row count) and decodable (every chunk read), shapes
    consistent across parts, no NaN or Inf, errors.jsonl agreeing with the ok flags. Each
    problem is named, then the repair: rerunning the extraction (no --overwrite) recomputes
    damaged parts and rewrites damaged meta columns.

    Example: featcache cache verify caches/faces-small
    """
    from .cache import verify_cache

    report = verify_cache(path)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif report.ok:
        click.echo(f"ok: {report.path}: {report.parts_checked} parts, {report.rows} rows, {report.ok_rows} ok")
    else:
        click.echo(f"FAILED: {report.path}")
        for p in report.problems:
            click.echo(f"  {p}")
        if report.repair:
            click.echo(f"repair: {report.repair}")
    sys.exit(0 if report.ok else 1)


@cache.command("export", context_settings=CONTEXT)
@click.argument("path", type=click.Path())
@click.option("--h5", "h5_out", required=True, type=click.Path(), help="HDF5 file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing HDF5 file.")
@quiet_option
@click.pass_obj
def cache_export_cmd(state, path, h5_out, overwrite):
    """Export features, ok flags and meta columns to HDF5.

    Example: featcache cache export caches/faces-small --h5 faces-small.h5
    """
    from .cache import export_h5

    out = export_h5(path, h5_out, overwrite=overwrite, progress=not state.quiet)
    click.echo(f"wrote {out}")


# -- detection fairness (DETR, FAAP) ---------------------------------------------------------
@synth_dataset("detection")
@click.option("--n", default=600, show_default=True, help="Number of images (half women, half men).")
@click.option("--gap", default=0.5, show_default=True,
              help="0 = women's figures as easy to detect as men's; 1 = much fainter and smaller.")
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--others", default=2, show_default=True,
              help="Other objects (cars, balls) per image at most, 0-4; 0: one person per image (the demo's).")
def synth_detection_cmd(state, out, n, seed, gap, size, others, overwrite):
    """Drawn people with a gender, and other objects: COCO JSON in the FAAP layout, and OUT/manifest.csv.

    Example: featcache synth detection data/det --n 400 --gap 0.7 --others 0
    """
    from .data.manifest import refuse_non_empty
    from .data.synth_detection import synth_detection

    refuse_non_empty(out, overwrite=overwrite)
    click.echo(json.dumps(synth_detection(out, n=n, seed=seed, gap=gap, size=size, others=others,
                                                  progress=not state.quiet),
                          indent=2))


@cli.command("finetune-detr", cls=_RegistryHelpCommand, context_settings=CONTEXT)
@click.option("--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the fine-tuned model.")
@click.option("--model", default=None, help="Starting point: an offline preset ({detr_presets}: random "
              "weights, nothing downloaded), a Hugging Face name or a folder [tiny].")
@click.option("--epochs", default=None, type=int, help="[30: configs/detr.yaml's training.epochs]")
@click.option("--batch-size", default=None, type=int, help="[16]")
@click.option("--lr", default=None, type=float, help="[1e-3]")
@click.option("--split", default=None, help="The only split it trains on [train].")
@click.option("--seed", default=None, type=int, help="[0]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda when present].")
@click.option("--overwrite", is_flag=True, help="Replace an existing fine-tune in --out (an interrupted one "
              "with the same options resumes without it).")
@quiet_option
@click.pass_obj
def finetune_detr_cmd(state, manifest_path, out, model, epochs, batch_size, lr, split, seed, device, overwrite):
    """Fit a DETR (the offline tiny one by default) to a detection manifest's train split.

    A randomly initialised DETR detects nothing; this gives the offline pipeline a detector to
    be fair or unfair. Extract from the result with `featcache extract --backbone detr --model OUT`.
    An alias of `featcache train-head detr --manifest M --out OUT` (each option sets one key of
    configs/detr.yaml); the run is evaluated (COCO AP, AP50, AR per gender) on the manifest's other
    splits, and `featcache evaluate OUT` evaluates it again.

    \b
    Example:
      featcache synth detection data/det
      featcache finetune-detr --manifest data/det/manifest.csv --out models/detr-tiny-det
    """
    from .e2e.detr_finetune import finetune_detr

    r = finetune_detr(manifest_path, out, model=model, epochs=epochs, batch_size=batch_size, lr=lr, split=split,
                      seed=seed, device=device, overwrite=overwrite, progress=not state.quiet, echo=click.echo)
    _print_run(r)


def main(argv=None) -> None:
    """Entry point: run the CLI, turning the errors a user can cause into one line and status 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        with called_from("cli"):  # errors name options as typed here (--overwrite, --set k=v)
            cli.main(args=args, prog_name="featcache", standalone_mode=False)
    except FeatcacheError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a write no library call mapped: a full disk, permission denied, ...
        if is_disk_full(exc):  # also safetensors' SafetensorError, which is not an OSError
            err = write_error(exc, getattr(exc, "filename", None) or "a file", None)
        else:
            err = FeatcacheError(str(exc)) if isinstance(exc, OSError) else None
        if debug or err is None:
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
