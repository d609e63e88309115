"""Registry commands: push, pull, ls, show, log, tag, diff, rm, gc, verify, copy (parse → library → format)."""

from __future__ import annotations

import json

import click

from adapterhub.cli import main
from adapterhub.cli.options import registry_option
from adapterhub.errors import ConfigError, IntegrityError
from adapterhub.registry import Registry
from adapterhub.registry.hub import is_hub_url
from adapterhub.registry.verify import repair_store


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


class _PushSource(click.Path):
    """A PEFT directory, or ``hf://org/name[@revision]`` (a PEFT repo on the Hugging Face Hub or in the HF cache)."""

    def convert(self, value, param, ctx):
        return value if is_hub_url(value) else super().convert(value, param, ctx)


@main.command("push")
@click.argument("directory", type=_PushSource(exists=True, file_okay=False))
@click.argument("task")
@click.option("--tag", "-t", "tags", multiple=True, help="Also point this tag at the new version (repeatable).")
@click.option("--annotation", "-a", "annotations", multiple=True, metavar="KEY=VALUE",
              help="Free-form annotation stored in the manifest (repeatable), e.g. eval.acc=0.91.")
@registry_option
def push(directory, task, tags, annotations, registry):
    """Store the PEFT adapter in DIRECTORY as the next version of TASK; prints the ref (TASK@vN).

    \b
    adapterhub push ./sql-lora sql --tag prod
    adapterhub push hf://org/sql-lora@main sql    # from the Hub or the local HF cache (HF_HUB_OFFLINE=1)
    """
    notes = {}
    for item in annotations:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--annotation")
        notes[key] = value
    click.echo(str(Registry(registry).push(directory, task, tags=tags, annotations=notes, progress=True)))


@main.command("pull")
@click.argument("ref")
@click.option("--output", "-o", "output", type=click.Path(), default=None,
              help="Destination directory (default: ./<task>-v<N>).")
@click.option("--force", "-f", is_flag=True,
              help="Replace a non-empty destination directory as a whole (every file in it is removed).")
@registry_option
def pull(ref, output, force, registry):
    """Write REF (task@vN, task:tag, task@sha256:…) as a PEFT adapter directory.

    \b
    adapterhub pull sql:prod -o ./sql            # refuses a non-empty ./sql
    adapterhub pull sql:prod -o ./sql --force    # replaces it in one step
    """
    reg = Registry(registry)
    resolved = reg.resolve(ref)
    path = reg.pull(str(resolved), output or f"{resolved.task}-v{resolved.version}", progress=True, force=force)
    click.echo(f"{resolved} → {path}")


def _warn(problems: list[str]) -> None:
    """Unreadable refs, on stderr: the listing goes on without them (stdout stays valid JSON with --json)."""
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)


@main.command("ls")
@click.argument("task", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@registry_option
def ls(task, as_json, registry):
    """List tasks, or the versions of TASK."""
    reg = Registry(registry)
    if task is None:
        rows = {t: v for t in reg.tasks() if (v := reg.versions(t))}  # a task rm'd meanwhile has none
        _warn(reg.ref_problems())
        if as_json:
            _echo_json([{"task": t, "versions": len(v), "latest": max(v)} for t, v in rows.items()])
        for t, v in ([] if as_json else rows.items()):
            click.echo(f"{t}\t{len(v)} versions\tlatest v{max(v)}")
        return
    problems: list[str] = []
    entries = reg.log(task, problems)
    _warn(problems)
    if as_json:
        _echo_json([_entry_json(e) for e in entries])
        return
    for e in entries:
        tags = f"\t[{', '.join(e.tags)}]" if e.tags else ""
        click.echo(f"{e.ref}\t{e.created}\t{e.nbytes} B\t{e.ref.digest[:19]}{tags}")


def _entry_json(entry) -> dict:
    """One version as JSON, for 'ls TASK --json' and 'log --json': the same keys in both, always all of them."""
    return {"ref": str(entry.ref), "version": entry.ref.version, "digest": entry.ref.digest,
            "created": entry.created, "tags": list(entry.tags), "annotations": dict(entry.annotations),
            "bytes": entry.nbytes}


@main.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the adapter config as JSON.")
@registry_option
def show(ref, as_json, registry):
    """Describe one version: config, base fingerprint, tensors."""
    reg = Registry(registry)
    resolved = reg.resolve(ref)
    manifest = reg.manifest(str(resolved))
    adapter = reg.load(str(resolved))
    config = adapter.config
    if as_json:
        _echo_json({"ref": str(resolved), "digest": resolved.digest, "created": manifest.created,
                    "annotations": dict(manifest.annotations), "config": config.to_dict(),
                    "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "digest": t.digest,
                                 "size": t.size} for t in manifest.tensors]})
        return
    kind = "DoRA" if config.use_dora else ("rsLoRA" if config.use_rslora else "LoRA")
    click.echo(f"{resolved}  {resolved.digest}\ncreated  {manifest.created}\n"
               f"adapter  {kind} r={config.r} alpha={config.lora_alpha} base={config.base_model_name_or_path}\n"
               f"modules  {len(adapter.module_shapes())}, {adapter.nbytes} bytes in {len(manifest.tensors)} tensors")
    for key, value in sorted(manifest.annotations.items()):
        click.echo(f"note     {key} = {value}")
    for t in manifest.tensors:
        click.echo(f"  {t.name}  {t.dtype}{list(t.shape)}  {t.digest[:19]}")


@main.command("log")
@click.argument("task")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: the records of 'ls TASK --json'.")
@registry_option
def log(task, as_json, registry):
    """History of TASK, newest first.

    \b
    adapterhub log sql
    adapterhub log sql --json | jq '.[0].annotations'
    """
    problems: list[str] = []
    entries = Registry(registry).log(task, problems)
    _warn(problems)
    if as_json:
        _echo_json([_entry_json(e) for e in entries])
        return
    for e in entries:
        click.echo(f"{e.ref}  {e.created}  {e.ref.digest}" + (f"  ({', '.join(e.tags)})" if e.tags else ""))
        for key, value in sorted(e.annotations.items()):
            click.echo(f"    {key}: {value}")


@main.command("tag")
@click.argument("ref")
@click.argument("tag")
@registry_option
def tag(ref, tag, registry):
    """Point TAG (movable) at REF."""
    resolved = Registry(registry).tag(ref, tag)
    click.echo(f"{resolved.task}:{tag} → {resolved}")


@main.command("diff")
@click.argument("a")
@click.argument("b")
@registry_option
def diff(a, b, registry):
    """Config and tensor differences between two refs."""
    d = Registry(registry).diff(a, b)
    for key, (old, new) in d.config.items():
        click.echo(f"config {key}: {json.dumps(old)} → {json.dumps(new)}")
    for name in d.removed:
        click.echo(f"- {name}")
    for name in d.added:
        click.echo(f"+ {name}")
    for name, old, new in d.changed:
        click.echo(f"~ {name}  {old[:19]} → {new[:19]}")
    if d.is_empty:
        click.echo("identical")


@main.command("rm")
@click.argument("ref")
@registry_option
def rm(ref, registry):
    """Remove a tag (task:tag) or a version (task@vN); blobs are freed by 'adapterhub gc'."""
    Registry(registry).remove(ref)
    click.echo(f"removed {ref}")


@main.command("gc")
@click.option("--dry-run", is_flag=True, help="Print the plan without deleting anything.")
@registry_option
def gc(dry_run, registry):
    """Delete blobs no version or tag references, and temp files of interrupted pushes.

    \b
    adapterhub gc --dry-run    # the plan and the bytes it expects to free
    adapterhub gc              # the bytes actually freed
    """
    click.echo(Registry(registry).gc(dry_run=dry_run).describe())


@main.command("verify")
@click.option("--repair", "source", metavar="SOURCE", default=None,
              help="First rewrite missing or corrupt blobs from SOURCE: a PEFT adapter directory or another "
                   "registry (path or oci:// URL) that holds them.")
@registry_option
def verify(source, registry):
    """Re-hash every blob and check every ref; exits non-zero on any problem.

    \b
    adapterhub verify                              # report only
    adapterhub verify --repair ./my-adapter        # rewrite damaged config / tensor blobs from a PEFT dir
    adapterhub verify --repair /mnt/backup/store   # ... or from another registry (manifests too)
    """
    reg = Registry(registry)
    if source is not None:
        click.echo(repair_store(reg.backend, source).describe())
    report = reg.verify()
    for problem in report.problems:
        click.echo(problem, err=True)
    if not report.ok:
        raise IntegrityError(f"{len(report.problems)} problems in {report.blobs_checked} blobs / "
                             f"{report.refs_checked} refs; see above")
    click.echo(f"ok: {report.blobs_checked} blobs, {report.refs_checked} refs")


@main.command("copy")
@click.argument("ref")
@click.option("--to", "to", required=True, metavar="LOCATION",
              help="Destination: a registry (path or oci:// URL), or hf://org/name[@branch] (a PEFT repo on the Hub).")
@click.option("--tags", "tags", default=None, metavar="A,B",
              help="Tags to point at the copy (comma-separated; '' for none). Default: REF's version's tags here.")
@click.option("--oras-files", is_flag=True,
              help="Store the copy as files (adapter_config.json, adapter_model.safetensors) that 'oras pull' "
                   "writes as a PEFT directory; oci:// destinations only.")
@registry_option
def copy(ref, to, tags, oras_files, registry):
    """Copy REF to another registry (only the blobs it lacks move) or to the Hugging Face Hub.

    \b
    adapterhub copy sql:prod --to oci://127.0.0.1:5000/team                 # carries sql's tags on that version
    adapterhub copy sql@v3 --to /mnt/backup --tags prod,stable
    adapterhub copy sql:prod --to oci://127.0.0.1:5000/team --oras-files    # then: oras pull …/team/sql:v3
    adapterhub copy sql:prod --to hf://my-org/sql-lora                      # PEFT repo + model card (HF_TOKEN)
    """
    reg = Registry(registry)
    if is_hub_url(to):
        if tags is not None or oras_files:
            raise ConfigError(f"--to {to} is a Hugging Face Hub repo, which takes neither --tags nor --oras-files; "
                              "drop them")
        click.echo(f"{reg.resolve(ref)} → {to} ({reg.export_to_hub(ref, to)})")
        return
    chosen = None if tags is None else tuple(t.strip() for t in tags.split(",") if t.strip())
    click.echo(f"{reg.copy(ref, to, progress=True, tags=chosen, oras_files=oras_files)} → {to}")
