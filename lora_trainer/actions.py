"""Requests from the UI and the HTTP API turned into jobs: checked fields, safe paths, one place.

Both front ends send plain dicts whose keys are the CLI/TrainConfig names in snake_case; this
module refuses unknown keys and bad values with LoraTrainerError messages (the API answers 4xx,
the UI shows them), resolves every path against the host's allowed roots, and queues the job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import ConfigError
from .jobs import Job, JobManager
from .paths import lora_subdir, resolve_user_path, validate_lora_name

# Request-only aliases (the API examples use `lr`).
TRAIN_ALIASES = {"lr": "learning_rate"}
# Not settable from a request: the host decides where runs go and which device trains.
TRAIN_FORBIDDEN = {"output_dir": "runs are written to the server's run folder",
                   "latent_cache_dir": "caches live in the run folder",
                   "device": "the server decides which device trains",
                   "overwrite": "finished LoRAs never overwrite existing files",
                   "resume": "use POST /jobs/{id}/resume to continue a stopped run"}
TRAIN_EXTRA = ("lora_subdir",)

TAG_FIELDS = {
    "data": "", "model": "", "general_threshold": 0.35, "character_threshold": 0.85,
    "general_mcut": False, "character_mcut": False, "include_characters": True, "include_rating": False,
    "replace_underscores": True, "trigger": "", "exclude": [], "always_first": [], "mode": "append",
    "batch_size": 8, "recursive": False,
}
TAG_ALIASES = {"folder": "data"}


def _roots(jobs: JobManager) -> list[Path] | None:
    return jobs.allowed_roots()


def _unknown(keys: set[str], known: set[str], what: str) -> None:
    if keys - known:
        raise ConfigError(f"Unknown field(s) {', '.join(sorted(keys - known))} in the {what} request; "
                          f"use only: {', '.join(sorted(known))}.")


# ---------------------------------------------------------------------- training
def train_config_from_request(jobs: JobManager, params: dict[str, Any], *,
                              defaults: dict[str, Any] | None = None) -> tuple[TrainConfig, str]:
    """(TrainConfig, lora sub-folder) from request fields; raises LoraTrainerError on bad input."""
    host = jobs.host
    if not isinstance(params, dict):
        raise ConfigError("The train request is not a JSON object; send {\"data\": ..., \"name\": ...}.")
    params = {TRAIN_ALIASES.get(k, k): v for k, v in params.items()}
    for key, why in TRAIN_FORBIDDEN.items():
        if key in params:
            raise ConfigError(f"The field {key} cannot be set in a request ({why}); remove it.")
    if not str(params.get("model") or "").strip():
        params.pop("model", None)
    elif getattr(host, "name", "") != "standalone":  # never silently train another model than asked
        raise ConfigError("This server trains the checkpoint the WebUI has loaded, so the request's model "
                          "would be ignored; remove \"model\" and load that checkpoint in the WebUI first.")
    elif getattr(host, "fixed_model", None):
        raise ConfigError(f"This server trains {host.fixed_model}, so the request's model would be ignored; "
                          "remove \"model\", or restart the server with --model instead of --tiny.")
    known = TrainConfig.field_names() - set(TRAIN_FORBIDDEN) | set(TRAIN_EXTRA)
    _unknown(set(params), known, "train")
    sub = str(params.pop("lora_subdir", "") or (defaults or {}).get("lora_subdir", "") or "")
    lora_subdir(Path(host.lora_dir()), sub)  # refuse a bad sub-folder now, not after training
    if "data" not in params or not str(params["data"]).strip():
        raise ConfigError("The train request has no data folder; set \"data\" to the prepared dataset folder.")
    roots = _roots(jobs)
    params["data"] = str(resolve_user_path(params["data"], roots, what="dataset folder"))
    if params.get("reg_data"):
        params["reg_data"] = str(resolve_user_path(params["reg_data"], roots, what="regularisation folder"))
    if params.get("leak_check_dir"):
        params["leak_check_dir"] = str(resolve_user_path(params["leak_check_dir"], roots, what="leak-check folder"))
    if params.get("model"):
        params["model"] = str(resolve_user_path(params["model"], roots, kind=None, what="model"))
    if "name" in params:
        params["name"] = validate_lora_name(str(params["name"]))
    config = TrainConfig.from_dict(params, source="the request")
    config.validate(need_model=False)
    if config.processes > 1:  # a WebUI/server job trains in its host's process, on one GPU
        from .launch import one_process_here

        raise ConfigError(one_process_here(config.processes))
    return config, sub


def submit_train(jobs: JobManager, params: dict[str, Any], *,
                 defaults: dict[str, Any] | None = None) -> Job:
    config, sub = train_config_from_request(jobs, dict(params), defaults=defaults)
    return jobs.submit_train(config, lora_subdir=sub)


# ---------------------------------------------------------------------- tagging
def submit_tag(jobs: JobManager, params: dict[str, Any], *, cache_dir: str | None = None,
               keep_out: dict[str, set[str]] | None = None) -> Job:
    """Queue WD14 tagging of a folder: `<stem>.txt` beside each image. keep_out: see `tag_folder`
    (the tab passes the tags the user removed; not a request field)."""
    if not isinstance(params, dict):
        raise ConfigError("The tag request is not a JSON object; send {\"data\": \"<folder>\"}.")
    params = {TAG_ALIASES.get(k, k): v for k, v in params.items()}
    _unknown(set(params), set(TAG_FIELDS), "tag")
    merged = {**TAG_FIELDS, **params}
    roots = _roots(jobs)
    folder = resolve_user_path(merged["data"], roots, what="image folder")
    model = str(merged["model"] or "").strip() or None
    if model and (Path(model).expanduser().exists() or Path(model).expanduser().is_absolute()
                  or model.startswith((".", "~"))):
        model = str(resolve_user_path(model, roots, what="tagger model folder"))
    from .tagger.thresholds import MODES, TagOptions

    if merged["mode"] not in MODES:
        raise ConfigError(f"Caption mode '{merged['mode']}' is unknown; use one of {', '.join(MODES)}.")
    try:
        options = TagOptions(
            general_threshold=float(merged["general_threshold"]),
            character_threshold=float(merged["character_threshold"]),
            general_mcut=bool(merged["general_mcut"]), character_mcut=bool(merged["character_mcut"]),
            include_characters=bool(merged["include_characters"]), include_rating=bool(merged["include_rating"]),
            replace_underscores=bool(merged["replace_underscores"]),
            trigger=str(merged["trigger"]).strip() or None,
            exclude=_tag_list(merged["exclude"]), always_first=_tag_list(merged["always_first"]))
        batch_size = int(merged["batch_size"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"A tag setting has a value of the wrong type ({e}); "
                          "send numbers for thresholds and batch_size.") from e
    options.validate()
    mode, recursive = merged["mode"], bool(merged["recursive"])

    def run(job: Job) -> dict[str, Any]:
        from .tagger.engine import Tagger
        from .tagger.folder import tag_folder

        job.message = "Loading the tagger…"
        tagger = Tagger.load(model, cache_dir=cache_dir or None)
        job.message = "Tagging…"
        result = tag_folder(folder, tagger, options, mode=mode, batch_size=batch_size, recursive=recursive,
                            on_progress=lambda done, total: job.progress(done, total, f"Tagged {done}/{total}"),
                            keep_out=keep_out)
        job.outputs = [str(folder / rel) for rel in result.captions]
        return {"message": f"Tagged {len(result.captions)} image(s) with {result.model} on {result.provider}"
                           + (f"; skipped {len(result.skipped)}." if result.skipped else "."),
                "captions": result.captions, "skipped": result.skipped, "provider": result.provider}

    return jobs.submit("tag", run, label=f"tag {folder.name}")


def _tag_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(t).strip() for t in value or [] if str(t).strip()]


# ---------------------------------------------------------------------- preparing
PREPARE_FIELDS = {"source": None, "out": None, "concept": None, "repeats": None, "class_images": None,
                  "class_name": None, "class_repeats": 1, "recursive": False, "resolution": 512,
                  "overwrite": False}
PREPARE_ALIASES = {"data": "source", "src": "source", "folder": "source"}


def submit_prepare(jobs: JobManager, params: dict[str, Any]) -> Job:
    """Queue building the Kohya layout (out/img/<repeats>_<concept>/...) from a folder of images."""
    if not isinstance(params, dict):
        raise ConfigError("The prepare request is not a JSON object; "
                          "send {\"source\": ..., \"out\": ..., \"concept\": ...}.")
    args = {PREPARE_ALIASES.get(k, k): v for k, v in params.items()}
    _unknown(set(args), set(PREPARE_FIELDS), "prepare")
    missing = [k for k in ("source", "concept") if not str(args.get(k) or "").strip()]
    if missing:
        raise ConfigError(f"The prepare request lacks {', '.join(missing)}; add those fields.")
    from .dataset.names import validate_name, validate_repeats

    args["concept"] = validate_name(str(args["concept"]))
    roots = _roots(jobs)
    args["source"] = resolve_user_path(args["source"], roots, what="image folder")
    if not str(args.get("out") or "").strip():  # default: a folder of our own, always allowed
        args["out"] = jobs.work_dir / "datasets" / validate_lora_name(args["concept"], what="concept")
    args["out"] = resolve_user_path(args["out"], roots, must_exist=False, what="dataset output folder")
    if args.get("class_images"):
        args["class_images"] = resolve_user_path(args["class_images"], roots, what="class image folder")
        if not str(args.get("class_name") or "").strip():
            raise ConfigError("Class images were given without a class name; set class_name, e.g. 'woman'.")
    try:
        for key in ("repeats", "class_repeats", "resolution"):
            if args.get(key) is not None:
                args[key] = int(args[key])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"repeats, class_repeats and resolution must be whole numbers ({e}); fix them.") from e
    if args.get("repeats") is not None:
        validate_repeats(args["repeats"])
    if not isinstance(args.get("overwrite", False), bool):
        raise ConfigError("overwrite must be true or false; send a JSON boolean.")
    source, out, concept = args.pop("source"), args.pop("out"), args.pop("concept")

    def run(job: Job) -> dict[str, Any]:
        from .dataset.prepare import prepare_dataset

        job.message = "Preparing the dataset…"
        result = prepare_dataset(source, out, concept, **args,
                                 on_progress=lambda d, t: job.progress(d, t, f"Prepared {d}/{t} images"))
        job.outputs = [str(result.out)]
        return prepare_summary(result)

    return jobs.submit("prepare", run, label=f"prepare {concept}", gpu=False)


def prepare_summary(result: Any) -> dict[str, Any]:
    """A JSON-able account of what prepare_dataset did (PrepareResult)."""
    manifest = _jsonable(result.manifest)
    training = manifest.get("training", {}) if isinstance(manifest, dict) else {}
    return {
        "out": str(result.out),
        "data": str(result.out),  # what to pass as `data` to /train
        "manifest": manifest,
        "written": len(result.written),
        "unchanged": result.unchanged,
        "removed": len(result.removed),
        "message": f"Prepared {result.out}: {_per_epoch(training)}.",
    }


def _per_epoch(training: dict[str, Any]) -> str:
    """What preparing decides: pictures × repeats per epoch. The steps follow from the batch size and
    epochs chosen for training (the manifest's steps assume batch 1 and its default epochs)."""
    if not training.get("images"):
        return "done"
    reg = " x 2 (regularisation images)" if training.get("regularisation_images") else ""
    per_epoch = training["images"] * training.get("repeats", 1) * (2 if reg else 1)
    return (f"{training['images']} images x {training.get('repeats', 1)} repeats{reg} = {per_epoch} samples per "
            "epoch; the steps are these / batch size x epochs, as set for training")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
