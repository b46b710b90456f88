"""A task's files on its worker: the uploaded directory placed in the created container before it starts
(:mod:`cloudai.uploads`), and the outputs copied out of the stopped container before it is removed
(:mod:`cloudai.outputs`). Used by :mod:`cloudai.executor`, which decides when (and fences the attempt)."""

from __future__ import annotations

import logging
import shutil
import tempfile

from cloudai.artifacts import INPUT_EXECUTION, UPLOAD_NAME, ArtifactStore
from cloudai.errors import RuntimeFailure, ServiceUnavailable, ValidationError
from cloudai.models import Task
from cloudai.outputs import collect
from cloudai.runoptions import numeric_owner
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.uploads import DEFAULT_TARGET, placement_archive

log = logging.getLogger(__name__)


def place_upload(runtime: DockerRuntime, store: ArtifactStore, task: Task, container_id: str, worker_id: str,
                 max_bytes: int) -> None:
    """Put ``task``'s upload into its created container ``container_id``: fetched from the artifact store, checked
    again with this worker's ``max_bytes`` and re-packed (:func:`placement_archive`), then unpacked by Docker.
    Raises :class:`RuntimeFailure` saying why it can't (the task fails before its container runs)."""
    found = store.get(task.task_id, INPUT_EXECUTION, "input", UPLOAD_NAME)
    if found is None:
        raise RuntimeFailure("the task's upload is no longer in the artifact store (CLOUDAI_ARTIFACT_RETENTION); "
                             "submit it again")
    with store.open(found) as blob, tempfile.TemporaryFile() as local:
        shutil.copyfileobj(blob, local, 1 << 20)  # a local copy: the archive is read twice
        try:
            archive, summary = placement_archive(local, task.upload or DEFAULT_TARGET,
                                                 numeric_owner(task.container_user), max_bytes)
        except ValidationError as exc:
            raise RuntimeFailure(f"worker {worker_id} refuses the upload: {exc}") from None
        with archive:
            runtime.put_archive(container_id, "/", archive)
    log.info("task %s: upload placed in %s (%d files)", task.task_id, task.upload, summary.files)


def collect_outputs(runtime: DockerRuntime, container_id: str, task: Task, store: ArtifactStore,
                    settings: Settings) -> tuple[list[str], str | None]:
    """Collect ``task``'s outputs (:func:`cloudai.outputs.collect`) with the operator's cap and quota: the log
    lines that say what was stored, and the note for the task's reason (None when all of it was). Never raises:
    an artifact store that is away leaves a note, and the outcome is recorded all the same."""
    try:
        collected = collect(runtime, container_id, task, store, settings.output_max_bytes,
                            settings.artifact_quota_bytes)
        return collected.log_lines(), collected.reason()
    except Exception as exc:
        log.exception("task %s: outputs not collected", task.task_id)
        what = "the artifact store can't be reached" if isinstance(exc, ServiceUnavailable) else type(exc).__name__
        note = f"outputs not stored: {what}"
        return [f"[cloudai] {note}"], note
