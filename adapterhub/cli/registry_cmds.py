"""Registry commands: push, pull, ls, show, log, tag, diff, rm, gc, verify, copy (parse → library → format).

Every command prints its result through `options.emit`: text, `--json` (shapes in docs/cli.md) or `--quiet`.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import click

from adapterhub.cli import main
from adapterhub.cli.options import emit, open_registry, output_options, registry_option, show_progress, warn
from adapterhub.errors import ConfigError, IntegrityError
from adapterhub.registry import Registry
from adapterhub.registry.hub import is_hub_url
from adapterhub.registry.verify import repair_store


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
@click.option("--base", "-b", "base_dir", default=None, type=click.Path(exists=True, file_okay=False),
              metavar="DIR", help="The base checkpoint the adapter was trained on (a Hugging Face dir): its identity "
                                  "is recorded, and loading the version on another base then fails.")
@registry_option
@output_options
def push(directory, task, tags, annotations, base_dir, registry, as_json, quiet):
    """Store the PEFT adapter in DIRECTORY as the next version of TASK; prints the ref (TASK@vN).

    \b
    adapterhub push ./my-adapter sql --tag prod --base ./llama-3.2-1b
    adapterhub push ./my-adapter sql --json | jq -r .ref
    adapterhub push hf://org/sql-lora@main sql    # from the Hub or the local HF cache (HF_HUB_OFFLINE=1)
    """
    notes = {}
    for item in annotations:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--annotation")
        notes[key] = value
    reg = open_registry(registry, reading=False)
    ref = reg.push(directory, task, tags=tags, annotations=notes, progress=show_progress(as_json, quiet),
                   base=base_dir)
    adapter_base = reg.base(ref)
    emit(as_json, quiet, {"ref": str(ref), "task": ref.task, "version": ref.version, "digest": ref.digest,
                          "tags": sorted(tags), "base": adapter_base.to_json() if adapter_base else None},
         str(ref), [str(ref)])


@main.command("pull")
@click.argument("ref")
@click.option("--output", "-o", "output", type=click.Path(), default=None,
              help="Destination directory (default: ./<task>-v<N>).")
@click.option("--force", "-f", is_flag=True,
              help="Replace a non-empty destination directory as a whole (every file in it is removed).")
@registry_option
@output_options
def pull(ref, output, force, registry, as_json, quiet):
    """Write REF (task@vN, task:tag, task@sha256:…) as a PEFT adapter directory (with its README.md model card).

    \b
    adapterhub pull sql:prod -o ./sql            # refuses a non-empty ./sql
    adapterhub pull sql:prod -o ./sql --force    # replaces it in one step
    """
    reg = open_registry(registry)
    resolved = reg.resolve(ref)
    path = reg.pull(str(resolved), output or f"{resolved.task}-v{resolved.version}",
                    progress=show_progress(as_json, quiet), force=force)
    emit(as_json, quiet, {"ref": str(resolved), "digest": resolved.digest, "path": str(path),
                          "files": sorted(p.name for p in path.iterdir())},
         f"{resolved} → {path}", [str(path)])


@main.command("ls")
@click.argument("task", required=False)
@registry_option
@output_options
def ls(task, registry, as_json, quiet):
    """List tasks, or the versions of TASK."""
    reg = open_registry(registry)
    if task is None:
        rows = {t: v for t in reg.tasks() if (v := reg.versions(t))}  # a task rm'd meanwhile has none
        warn(reg.ref_problems())
        emit(as_json, quiet, [{"task": t, "versions": len(v), "latest": max(v)} for t, v in rows.items()],
             [f"{t}\t{len(v)} versions\tlatest v{max(v)}" for t, v in rows.items()], list(rows))
        return
    problems: list[str] = []
    entries = reg.log(task, problems)
    warn(problems)
    emit(as_json, quiet, [_entry_json(e) for e in entries],
         [f"{e.ref}\t{e.created}\t{e.nbytes} B\t{e.ref.digest[:19]}" + (f"\t[{', '.join(e.tags)}]" if e.tags else "")
          for e in entries], [str(e.ref) for e in entries])


def _entry_json(entry) -> dict:
    """One version as JSON, for 'ls TASK --json' and 'log --json': the same keys in both, always all of them."""
    return {"ref": str(entry.ref), "version": entry.ref.version, "digest": entry.ref.digest,
            "created": entry.created, "tags": list(entry.tags), "annotations": dict(entry.annotations),
            "bytes": entry.nbytes}


@main.command("show")
@click.argument("ref")
@click.option("--tensors", "with_tensors", is_flag=True, help="List every tensor (name, dtype, shape, digest).")
@registry_option
@output_options
def show(ref, with_tensors, registry, as_json, quiet):
    """Describe one version: config, base, a summary of its tensors (count, bytes, ranks, modules).

    \b
    adapterhub show sql:prod
    adapterhub show sql@v3 --tensors
    adapterhub show sql@v3 --json | jq .summary.ranks
    """
    reg = open_registry(registry)
    resolved = reg.resolve(ref)
    manifest = reg.manifest(str(resolved))
    adapter = reg.load(f"{resolved.task}@{resolved.digest}")
    config, summary = adapter.config, _summary(adapter, manifest)
    tensors = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "digest": t.digest, "size": t.size}
               for t in manifest.tensors]
    value = {"ref": str(resolved), "digest": resolved.digest, "created": manifest.created,
             "annotations": dict(manifest.annotations), "config": config.to_dict(), "summary": summary,
             "base": adapter.base.to_json() if adapter.base else None, "model_card": adapter.model_card,
             "tensors": tensors}
    lines = [f"{resolved}  {resolved.digest}", f"created  {manifest.created}",
             f"adapter  {summary['kind']} r={config.r} alpha={config.lora_alpha}",
             f"base     {adapter.base.describe() if adapter.base else 'not recorded'}",
             f"modules  {summary['modules']}; ranks {_counts(summary['ranks'], 'r=')}; "
             f"targets {_counts(summary['targets'])}",
             f"tensors  {summary['tensors']}, {summary['bytes']} bytes ({_counts(summary['dtypes'])})"]
    if adapter.model_card is not None:
        lines.append(f"card     README.md, {len(adapter.model_card.encode())} bytes")
    lines += [f"note     {key} = {value}" for key, value in sorted(manifest.annotations.items())]
    if with_tensors:
        lines += [f"  {t['name']}  {t['dtype']}{t['shape']}  {t['digest'][:19]}" for t in tensors]
    emit(as_json, quiet, value, lines, [str(resolved)])


def _summary(adapter, manifest) -> dict:
    """Counts of one version: tensors, bytes, adapted modules, modules per rank / dtype / target."""
    modules = adapter.modules()
    kind = "DoRA" if adapter.config.use_dora else ("rsLoRA" if adapter.config.use_rslora else "LoRA")
    targets = Counter(re.sub(r"^(.*\.)?layers\.\d+\.", "", name) for name in modules)
    return {"kind": kind, "tensors": len(manifest.tensors), "bytes": sum(t.size for t in manifest.tensors),
            "modules": len(modules), "ranks": {str(r): n for r, n in sorted(Counter(m.rank for m in modules.values()).items())},
            "dtypes": dict(sorted(Counter(t.dtype for t in manifest.tensors).items())),
            "targets": dict(sorted(targets.items()))}


def _counts(counts: dict, prefix: str = "") -> str:
    return ", ".join(f"{prefix}{key} ×{n}" for key, n in counts.items())


@main.command("log")
@click.argument("task")
@registry_option
@output_options
def log(task, registry, as_json, quiet):
    """History of TASK, newest first.

    \b
    adapterhub log sql
    adapterhub log sql --json | jq '.[0].annotations'
    """
    problems: list[str] = []
    entries = open_registry(registry).log(task, problems)
    warn(problems)
    lines = []
    for e in entries:
        lines.append(f"{e.ref}  {e.created}  {e.ref.digest}" + (f"  ({', '.join(e.tags)})" if e.tags else ""))
        lines += [f"    {key}: {value}" for key, value in sorted(e.annotations.items())]
    emit(as_json, quiet, [_entry_json(e) for e in entries], lines, [str(e.ref) for e in entries])


@main.command("tag")
@click.argument("ref")
@click.argument("tag")
@registry_option
@output_options
def tag(ref, tag, registry, as_json, quiet):
    """Point TAG (movable) at REF."""
    resolved = open_registry(registry).tag(ref, tag)
    emit(as_json, quiet, {"ref": str(resolved), "tag": f"{resolved.task}:{tag}", "digest": resolved.digest},
         f"{resolved.task}:{tag} → {resolved}", [str(resolved)])


@main.command("diff")
@click.argument("a")
@click.argument("b")
@registry_option
@output_options
def diff(a, b, registry, as_json, quiet):
    """Config, base and tensor differences between two refs; each differing tensor with its shapes and relative
    change ‖a − b‖ / ‖a‖.

    \b
    adapterhub diff sql@v1 sql@v2
    adapterhub diff sql@v1 sql:prod --json | jq '.tensors[] | select(.relative_change > 0.5)'
    """
    d = open_registry(registry).diff(a, b)
    base = None if d.base is None else {"a": d.base[0] and d.base[0].to_json(), "b": d.base[1] and d.base[1].to_json()}
    value = {"a": a, "b": b, "identical": d.is_empty, "base": base,
             "config": {key: [old, new] for key, (old, new) in d.config.items()},
             "tensors": [{**t.to_json(), "change": _change_kind(t)} for t in d.tensors]}
    lines = [f"config {key}: {json.dumps(old)} → {json.dumps(new)}" for key, (old, new) in d.config.items()]
    if d.base is not None:
        lines.append(f"base   {_describe(d.base[0])} → {_describe(d.base[1])}")
    for t in d.tensors:
        (da, db), (sa, sb) = t.dtype, t.shape
        if sa is None:
            lines.append(f"+ {t.name}  {db}{list(sb)}")
        elif sb is None:
            lines.append(f"- {t.name}  {da}{list(sa)}")
        else:
            shapes = f"{da}{list(sa)}" if (da, sa) == (db, sb) else f"{da}{list(sa)} → {db}{list(sb)}"
            change = "n/a" if t.relative_change is None else f"{t.relative_change:.3e}"
            lines.append(f"~ {t.name}  {shapes}  relative change {change}")
    if d.is_empty:
        lines.append("identical")
    emit(as_json, quiet, value, lines, [t.name for t in d.tensors])


def _change_kind(change) -> str:
    return "added" if change.shape[0] is None else ("removed" if change.shape[1] is None else "changed")


def _describe(identity) -> str:
    return identity.describe() if identity is not None else "not recorded"


@main.command("rm")
@click.argument("ref")
@registry_option
@output_options
def rm(ref, registry, as_json, quiet):
    """Remove a tag (task:tag) or a version (task@vN); blobs are freed by 'adapterhub gc'."""
    open_registry(registry).remove(ref)
    emit(as_json, quiet, {"removed": ref}, f"removed {ref}")


@main.command("gc")
@click.option("--dry-run", is_flag=True, help="Print the plan without deleting anything.")
@registry_option
@output_options
def gc(dry_run, registry, as_json, quiet):
    """Delete blobs no version or tag references, and temp files of interrupted pushes.

    \b
    adapterhub gc --dry-run    # the plan and the bytes it expects to free
    adapterhub gc              # the bytes actually freed
    """
    outcome = open_registry(registry).gc(dry_run=dry_run)
    if dry_run:
        value = {"dry_run": True, "blobs": len(outcome.blobs), "temp_files": len(outcome.temp_files),
                 "bytes": outcome.expected_freed_bytes}
    else:
        value = {"dry_run": False, "blobs": len(outcome.removed_blobs), "temp_files": len(outcome.removed_temp_files),
                 "bytes": outcome.freed_bytes, "skipped": outcome.skipped}
    emit(as_json, quiet, value, outcome.describe())


@main.command("verify")
@click.option("--repair", "source", metavar="SOURCE", default=None,
              help="First rewrite missing or corrupt blobs from SOURCE: a PEFT adapter directory or another "
                   "registry (path or oci:// URL) that holds them.")
@registry_option
@output_options
def verify(source, registry, as_json, quiet):
    """Re-hash every blob and check every ref; exits non-zero on any problem.

    \b
    adapterhub verify                              # report only
    adapterhub verify --repair ./my-adapter        # rewrite damaged config / tensor blobs from a PEFT dir
    adapterhub verify --repair /mnt/backup/store   # ... or from another registry (manifests too)
    """
    reg = open_registry(registry)
    repaired = repair_store(reg.backend, source) if source is not None else None
    if repaired is not None and not as_json and not quiet:
        click.echo(repaired.describe())
    report = reg.verify()
    value = {"ok": report.ok, "blobs_checked": report.blobs_checked, "refs_checked": report.refs_checked,
             "problems": list(report.problems),
             "repaired": None if repaired is None else {"blobs": list(repaired.repaired),
                                                        "unrepaired": list(repaired.unrepaired)}}
    if as_json:
        emit(True, quiet, value)
        if not report.ok:
            raise click.exceptions.Exit(1)
        return
    for problem in report.problems:
        click.echo(problem, err=True)
    if not report.ok:
        raise IntegrityError(f"{len(report.problems)} problems in {report.blobs_checked} blobs / "
                             f"{report.refs_checked} refs; see above")
    emit(False, quiet, value, f"ok: {report.blobs_checked} blobs, {report.refs_checked} refs")


def _copied_tags(copied, to) -> list[str]:
    """The tags that name the copied version at its destination."""
    return sorted(tag for tag, at in Registry(to).tags(copied.task).items() if at.digest == copied.digest)


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
@output_options
def copy(ref, to, tags, oras_files, registry, as_json, quiet):
    """Copy REF to another registry (only the blobs it lacks move) or to the Hugging Face Hub.

    \b
    adapterhub copy sql:prod --to oci://127.0.0.1:5000/team                 # carries sql's tags on that version
    adapterhub copy sql@v3 --to /mnt/backup --tags prod,stable
    adapterhub copy sql:prod --to oci://127.0.0.1:5000/team --oras-files    # then: oras pull …/team/sql:v3
    adapterhub copy sql:prod --to hf://my-org/sql-lora                      # PEFT repo + model card (HF_TOKEN)
    """
    reg = open_registry(registry)
    if is_hub_url(to):
        if tags is not None or oras_files:
            raise ConfigError(f"--to {to} is a Hugging Face Hub repo, which takes neither --tags nor --oras-files; "
                              "drop them")
        resolved = reg.resolve(ref)
        url = reg.export_to_hub(str(resolved), to)  # the version resolved above, even if a tag moves
        emit(as_json, quiet, {"ref": str(resolved), "digest": resolved.digest, "to": str(to), "commit_url": url},
             f"{resolved} → {to} ({url})", [str(resolved)])
        return
    chosen = None if tags is None else tuple(t.strip() for t in tags.split(",") if t.strip())
    copied = reg.copy(ref, to, progress=show_progress(as_json, quiet), tags=chosen, oras_files=oras_files)
    emit(as_json, quiet, {"ref": str(copied), "digest": copied.digest, "to": str(to), "tags": _copied_tags(copied, to)},
         f"{copied} → {to}", [str(copied)])
