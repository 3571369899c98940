"""The JSON record committed with every backup: where training stands, and what is on disk.

No pickle: this record is plain JSON with a format version, and it is the
last file written before a backup is committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FORMAT = "ft-backup"
VERSION = 2  # 2: `array_crc32c` and the files it covers ({"array_crc32c": 1})
READS = (1, 2)  # versions this ft reads; a version-1 record has no `array_crc32c`
FILENAME = "ft-backup.json"


@dataclass
class BackupRecord:
    """Where training stood when a backup was taken, and the files it consists of.

    Attributes:
        epoch: Zero-based epoch to resume at.
        batch: Batches of `epoch` already trained; training resumes at this index.
        step: Training batches completed since the run began (the global step).
        data_position: Batches drawn from the current input iterator, which can
            exceed `batch` when `steps_per_epoch` keeps one iterator across epochs.
        backend: Keras backend that wrote the backup.
        num_processes: How many processes took part in the run.
        written_at: UTC time of the commit, ISO 8601.
        variables: JSON manifest of the saved variables (see `training_state`).
        rng: Host random state (`ft.host_rng`) when the input iterator that
            `data_position` counts into started, or None.
        input_iteration: How many input iterators the run had started before
            that one (it orders a `tf.data` input that reshuffles each
            iteration). Records written before ft recorded it read as 0.
        files: Relative path -> {"size": bytes, "crc32": int} for every file;
            for an OCDBT data file {"size": bytes, "array_crc32c": 1} when its
            arrays' bytes are covered by `array_crc32c`, or {"size": bytes,
            "chunk_crc32c": 1} when its array chunks carry a crc32c that
            TensorStore checks as it reads them.
        array_crc32c: Orbax's array name -> CRC-32C of the array's bytes, for a
            backup written by a process that held every array whole
            (`ft.store.array_checksums`); empty when the chunks carry the codec
            instead (and in version-1 records).
        extra: Anything an engine adapter adds; kept as given.
    """

    epoch: int
    batch: int
    step: int
    data_position: int
    backend: str
    num_processes: int
    written_at: str
    variables: dict[str, Any]
    rng: dict[str, Any] | None = None
    input_iteration: int = 0
    files: dict[str, dict[str, int]] = field(default_factory=dict)
    array_crc32c: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION}
        body.update(self.__dict__)
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BackupRecord:
        """Parse a record; raises ValueError when it is not one ft can read."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} record")
        version = data.get("version")
        if version not in READS:
            raise ValueError(
                f"record version {version!r}, this ft reads versions {READS}: upgrade ft to read it"
            )
        try:
            return cls(
                epoch=int(data["epoch"]),
                batch=int(data["batch"]),
                step=int(data["step"]),
                data_position=int(data["data_position"]),
                backend=str(data["backend"]),
                num_processes=int(data["num_processes"]),
                written_at=str(data["written_at"]),
                variables=dict(data["variables"]),
                rng=data.get("rng"),
                input_iteration=int(data.get("input_iteration", 0)),
                files={str(k): dict(v) for k, v in data.get("files", {}).items()},
                array_crc32c={str(k): int(v) for k, v in data.get("array_crc32c", {}).items()},
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"incomplete {FORMAT} record: {e!r}") from e
