"""Write a model into a Triton model repository that the onnxruntime backend loads as written.

Layout (Triton's own)::

    REPO/NAME/config.pbtxt            one config for every version of NAME
    REPO/NAME/fuse_report_vN.json     the fuse report of version N, when there is one
    REPO/NAME/N/model.onnx            version N (+ model.onnx.data when the weights are external)

Existing repositories. A new version goes beside the old ones (default: one above the highest). An
existing version is replaced only with `force`. Triton reads a single `config.pbtxt` for all versions of a
model, so the config written for the new version must also be the one already there: when the existing
file says something else (another input shape, other instance groups, fields lc-onnx does not write) the
write is refused unless `force`, which replaces it. The two are compared as Triton reads them, parsed into
its `ModelConfig` message, so a file that differs only in spacing, order or comments (one written by an
older lc-onnx, say) counts as the same and is left as it is. With Triton's default version policy (serve the highest version
only) that is what serving the new version needs; older versions whose graphs no longer match the new
config would fail to load under a policy that serves them too, which is why it takes `force`.

Atomicity. A new model directory is assembled in a hidden temporary directory in REPO and renamed into
place in one step; a new version of an existing model is assembled in a hidden temporary directory in
REPO/NAME and renamed to N (a replaced version is moved aside first and restored if the rename fails);
`config.pbtxt` and the report are written to temporary files and renamed. On any failure the temporary
directories are removed, so Triton never sees a half-written model or version directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf import text_format

from lc_onnx.deploy import model_config
from lc_onnx.deploy.config import TritonConfig, build_config
from lc_onnx.deploy.options import DEFAULT_MAX_BATCH_SIZE, TritonOptions
from lc_onnx.errors import UserError, one_line
from lc_onnx.model import files, io, runtime

log = logging.getLogger(__name__)

CONFIG_NAME = "config.pbtxt"
MODEL_FILE = "model.onnx"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RepositoryPlan:
    """What a write would do, decided before anything is written."""

    model_dir: Path
    version: int
    config: TritonConfig
    config_text: str

    @property
    def version_dir(self) -> Path:
        return self.model_dir / str(self.version)


def check_model_repository(
    model: onnx.ModelProto | io.LoadedModel | str | os.PathLike,
    repo_dir: str | os.PathLike,
    options: TritonOptions | None = None,
) -> RepositoryPlan:
    """Make every check `write_model_repository` makes, write nothing, and say what it would write.

    Fusing keeps the graph's inputs and outputs, so checking the original model before a long fuse
    catches a bad option (a batch size on a graph without a batch dimension, an existing version) early.
    """
    return _plan(io.as_loaded(model), Path(repo_dir), options or TritonOptions())


def write_model_repository(
    model: onnx.ModelProto | io.LoadedModel | str | os.PathLike,
    repo_dir: str | os.PathLike,
    options: TritonOptions | None = None,
    *,
    report: Mapping[str, Any] | None = None,
    check_loads: bool = True,
) -> Path:
    """Write `model` as a new version of a model in the Triton repository `repo_dir`.

    Args:
        model: a path to an `.onnx` file (external data is streamed, not loaded), a `LoadedModel`, or an
            in-memory proto (whose tensors must then all be inline).
        options: serving options; the name defaults to the model file's stem (for a proto without a
            path: the graph's name), the version to one above the highest existing one.
        report: the fuse report (`Report.to_dict()`), written as `fuse_report_vN.json` beside the config;
            without one, a replaced version's old report is removed.
        check_loads: open the staged model in onnxruntime (CPU) before publishing it and check its input
            and output names against the config.

    Returns:
        The version directory that was written.
    """
    loaded = io.as_loaded(model)
    repo = Path(repo_dir)
    plan = _plan(loaded, repo, options or TritonOptions())
    report_text = json.dumps(dict(report), indent=2) + "\n" if report is not None else None
    model_dir, version = plan.model_dir, plan.version

    created_repo = not repo.exists()
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{repo}: cannot create ({exc.strerror or exc})") from None
    try:
        if not model_dir.exists():
            _write_new_model(loaded, plan, report_text, check_loads)
        else:
            _write_version(loaded, plan.config, model_dir, version, check_loads)
            # An existing config that reads the same to Triton stays as it is (Triton may poll it).
            old = _read_text(model_dir / CONFIG_NAME)
            if old is None or _config_difference(old, plan.config) is not None:
                if old is not None:
                    log.warning("replacing %s", model_dir / CONFIG_NAME)
                files.write_text(model_dir / CONFIG_NAME, plan.config_text)
            if report_text is not None:
                files.write_text(model_dir / _report_name(version), report_text)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(model_dir / _report_name(version))
    except BaseException:
        if created_repo:
            with contextlib.suppress(OSError):
                repo.rmdir()  # only succeeds when nothing else landed in it
        raise
    log.info("wrote %s (max_batch_size %d)", plan.version_dir, plan.config.max_batch_size)
    return plan.version_dir


def _plan(loaded: io.LoadedModel, repo: Path, options: TritonOptions) -> RepositoryPlan:
    name = _model_name(options.name, loaded)
    instance_kind = options.instance_kind or ("gpu" if options.accelerator != "none" else "cpu")
    config = build_config(
        loaded.proto,
        name,
        max_batch_size=options.max_batch_size,
        default_max_batch_size=DEFAULT_MAX_BATCH_SIZE,
        instance_kind=instance_kind,
        instances=options.instances,
        dynamic_batching=options.dynamic_batching,
        accelerator=options.accelerator,
    )
    if repo.exists() and not repo.is_dir():
        raise UserError(f"{repo}: exists and is not a directory")
    model_dir = repo / name
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"{model_dir}: exists and is not a directory")
    existing = _versions(model_dir)
    version = options.version if options.version is not None else max(existing, default=0) + 1
    plan = RepositoryPlan(model_dir, version, config, config.to_pbtxt())
    if plan.version_dir.exists() and not options.force:
        raise UserError(
            f"{plan.version_dir}: version {version} already exists; pass {{force}} to replace it",
            params=["force"],
        )
    if not options.force:
        _check_config_compatible(model_dir / CONFIG_NAME, config)
    if loaded.path is not None and _inside(loaded.path, plan.version_dir):
        raise UserError(
            f"{loaded.path}: the input model is inside {plan.version_dir}, which would be replaced"
        )
    if existing and version < max(existing):
        log.warning(
            "version %d is below the highest existing version %d; Triton's default policy serves only %d",
            version, max(existing), max(existing),
        )  # fmt: skip
    return plan


def _model_name(name: str | None, loaded: io.LoadedModel) -> str:
    if name is None:
        if loaded.path is not None:
            file_name = loaded.path.name
            name = file_name[: -len(".onnx")] if file_name.endswith(".onnx") else loaded.path.stem
        else:
            name = loaded.proto.graph.name
    if not name or not _NAME_RE.fullmatch(name) or name.isdigit():
        raise UserError(
            f"model name {name!r} is not usable as a Triton model directory; pass {{name}} with letters, "
            "digits, '_', '-' or '.' (not starting with '.' or '-')",
            params=["name"],
        )
    return name


def _versions(model_dir: Path) -> list[int]:
    # Triton ignores subdirectories that are not a positive number without leading zeros.
    if not model_dir.is_dir():
        return []
    return [
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    ]


def _check_config_compatible(path: Path, config: TritonConfig) -> None:
    """Refuse when the config at `path` (if any) does not read to Triton as `config` does."""
    old = _read_text(path)
    difference = _config_difference(old, config) if old is not None else None
    if difference is not None:
        raise UserError(
            f"{path} {difference}; Triton uses one config for all versions: pass {{force}} to replace it "
            "or use another {name}",
            params=["force", "name"],
        )


def _config_difference(old_text: str, config: TritonConfig) -> str | None:
    """What is wrong with the existing config `old_text` for `config`, to follow its path in a message
    (`differs from the config for this model (input[0].dims: [4], would be [6])`); None when it says the
    same to Triton, however it is spelled."""
    try:
        old = model_config.parse(old_text)
    except text_format.ParseError as exc:
        return f"is not a config lc-onnx writes ({one_line(exc)})"
    difference = model_config.difference(old, config.to_proto())
    return f"differs from the config for this model ({difference})" if difference is not None else None


def _write_new_model(
    loaded: io.LoadedModel, plan: RepositoryPlan, report_text: str | None, check_loads: bool
) -> None:
    model_dir = plan.model_dir
    with files.staging_dir(model_dir.parent, f".{model_dir.name}.lc-onnx-") as stage:
        _save_version(loaded, plan.config, stage / str(plan.version), check_loads)
        (stage / CONFIG_NAME).write_text(plan.config_text)
        if report_text is not None:
            (stage / _report_name(plan.version)).write_text(report_text)
        files.make_public(stage)
        try:
            os.rename(stage, model_dir)
        except OSError as exc:
            raise UserError(f"{model_dir}: cannot create ({exc.strerror or exc})") from None


def _write_version(
    loaded: io.LoadedModel, config: TritonConfig, model_dir: Path, version: int, check_loads: bool
) -> None:
    target = model_dir / str(version)
    with files.staging_dir(model_dir, f".lc-onnx-v{version}-") as stage:
        _save_version(loaded, config, stage / "v", check_loads)
        files.make_public(stage)
        aside = None
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".lc-onnx-old-v{version}-", dir=model_dir))
            os.rename(target, aside / "v")
        try:
            os.rename(stage / "v", target)
        except OSError as exc:
            if aside is not None:
                os.rename(aside / "v", target)
            raise UserError(f"{target}: cannot create ({exc.strerror or exc})") from None
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)


def _save_version(loaded: io.LoadedModel, config: TritonConfig, version_dir: Path, check_loads: bool) -> None:
    version_dir.mkdir()
    # io.save rewrites the proto's external-data references to the new file; the caller's proto (which
    # io.as_loaded wraps without copying) must keep pointing at its own files, so save a copy.
    proto = onnx.ModelProto()
    proto.CopyFrom(loaded.proto)
    path = io.save(dataclasses.replace(loaded, proto=proto), version_dir / MODEL_FILE)
    if check_loads:
        _check_onnxruntime_loads(path, config)


def _check_onnxruntime_loads(path: Path, config: TritonConfig) -> None:
    try:
        runtime.import_ort()
    except UserError:
        log.warning("onnxruntime is not installed; not checking that %s loads", path)
        return
    session = runtime.session(path, name="the model")
    for role, declared, actual in (
        ("inputs", [t.name for t in config.signature.inputs], [i.name for i in session.get_inputs()]),
        ("outputs", [t.name for t in config.signature.outputs], [o.name for o in session.get_outputs()]),
    ):
        if sorted(declared) != sorted(actual):
            raise UserError(f"onnxruntime sees {role} {actual}, the graph declares {declared}")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def _report_name(version: int) -> str:
    return f"fuse_report_v{version}.json"


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "RepositoryPlan",
    "TritonOptions",
    "check_model_repository",
    "write_model_repository",
]
