"""Grids, cells and their keys: the part of the grid engine every kind of grid (bench, attack) shares.

A grid is a list of :class:`GridCell`, each the coordinates (``axes``) of one independent run.  A *job*
(:class:`GridJob`) knows how to list its cells, load what they need once (model, data), fingerprint it
(:meth:`GridJob.identity`) and run one cell.  The key of a cell hashes its kind, its axes and that identity
(model weights, data content, grid-wide parameters, package version), so a stored result is reused only for
exactly the same computation.  :mod:`tta_norm.bench.engine` runs jobs, :mod:`tta_norm.bench.store` stores
their records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tta_norm.bench.validate import ConfigError, user_error


def digest(payload: Any, n: int = 20) -> str:
    """Hex SHA-256 prefix of the canonical JSON of ``payload`` (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class GridCell:
    """One point of a grid: its position, JSON coordinates (``axes``), a short label and the typed cell."""

    index: int
    axes: dict[str, Any]
    label: str
    payload: Any

    def axes_key(self, kind: str) -> str:
        """Hash of the coordinates only (the same cell of another model/data/version has the same one)."""
        return digest({"kind": kind, "cell": self.axes})

    def key(self, kind: str, identity: dict[str, Any]) -> str:
        """Hash of everything the result depends on: kind, coordinates and the grid's identity."""
        return digest({"kind": kind, "cell": self.axes, "identity": identity})


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1 <= K <= N) as ``(K, N)``; ``None`` for no sharding."""
    if text is None:
        return None
    k, sep, n = str(text).partition("/")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        k_i = n_i = 0
    if not sep or not 1 <= k_i <= n_i:
        raise ConfigError(f"--shard: expected K/N with 1 <= K <= N (e.g. 2/4), got {text!r}")
    return k_i, n_i


def shard_cells(cells: Sequence[GridCell], shard: tuple[int, int] | None) -> list[GridCell]:
    """The deterministic slice ``K/N`` of ``cells``: every N-th cell of the grid order, starting at the K-th."""
    if shard is None:
        return list(cells)
    k, n = shard
    return [c for c in cells if c.index % n == k - 1]


@functools.cache
def git_revision() -> str | None:
    """The git commit of the running package's checkout, or ``None``; read once per process, the code it has
    imported.  See :func:`checkout_revision`."""
    return checkout_revision(Path(__file__).resolve().parents[2])


def checkout_revision(root: Path) -> str | None:
    """``<commit>`` of the git checkout at ``root``, ``<commit>-dirty-<hash of the diff>`` when tracked files
    changed (two different uncommitted edits never read as one revision), ``None`` outside a checkout."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30)

    try:
        out = git("rev-parse", "HEAD")
        if out.returncode != 0:
            return None
        diff = git("diff", "--no-ext-diff", "--no-color", "--no-textconv", "--src-prefix=a/", "--dst-prefix=b/",
                   "--full-index", "--binary", "HEAD")  # the same bytes whatever the user's git config
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.decode().strip()
    if diff.returncode != 0 or not diff.stdout.strip():
        return commit + ("-dirty" if diff.returncode != 0 else "")
    return f"{commit}-dirty-{hashlib.sha1(diff.stdout).hexdigest()[:10]}"


def environment() -> dict[str, Any]:
    """Versions, code revision and machine facts stored with every record (not part of the key)."""
    import torch

    import tta_norm

    return {
        "tta_norm": tta_norm.__version__,
        "git": git_revision(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "node": platform.node(),
    }


class GridJob:
    """A grid to run: subclasses set ``kind`` and implement the hooks below.

    Only :meth:`run_cell` runs per cell (possibly in another process: a job and its prepared state must
    pickle); everything else runs once in the driver."""

    kind: str = "grid"
    config: Any = None

    # ---- once, in the driver -------------------------------------------------------------------------
    def cells(self) -> list[GridCell]:
        raise NotImplementedError

    def validate(self) -> None:
        """Resolve and check everything a cell needs without loading it (``--dry-run``); raise ConfigError."""

    def prepare(self, device: Any) -> Any:
        """Load what every cell needs (model, data) once; return it as the job's state."""
        raise NotImplementedError

    def identity(self, state: Any) -> dict[str, Any]:
        """Model identity, data identity, grid-wide parameters and the package version (part of every key)."""
        raise NotImplementedError

    def cell_identity(self, cell: GridCell, identity: dict[str, Any]) -> dict[str, Any]:
        """The part of ``identity`` that ``cell``'s key and record hold (all of it by default)."""
        return identity

    def cell_key(self, cell: GridCell, identity: dict[str, Any]) -> str:
        return cell.key(self.kind, self.cell_identity(cell, identity))

    def data_description(self, state: Any) -> str:
        return ""

    def work(self, cell: GridCell, state: Any) -> int:
        """Progress units of ``cell`` (images, batches); 1 by default."""
        return 1

    def cost(self, cell: GridCell, state: Any) -> float:
        """Relative compute of ``cell``, for scheduling only (parallel executors start the costliest cells
        first); :meth:`work` by default.  Never part of a key or a result."""
        return float(self.work(cell, state))

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        """Numbers of a finished record for trackers (TensorBoard)."""
        return {}

    def write_outputs(self, out: Path, records: list[dict[str, Any]], missing: int = 0) -> Path:
        """Derived files (CSV, report, plots) from the stored records only; returns the report path.  ``missing``:
        cells of the grid without a stored record (the report says it is incomplete)."""
        raise NotImplementedError

    # ---- per cell ------------------------------------------------------------------------------------
    def run_cell(self, cell: GridCell, state: Any, device: Any, progress: Callable[[int], None] | None) -> dict:
        """The metrics of one cell (JSON-friendly)."""
        raise NotImplementedError

    def warm_up(self, state: Any, device: Any) -> None:
        """One-time per-process set-up outside any timed region (compiled kernels)."""
        from tta_norm import kernels

        kernels.available()

    def record(
        self,
        cell: GridCell,
        state: Any,
        device: Any,
        identity: dict[str, Any],
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Run ``cell`` and wrap its outcome in a record; an exception becomes a ``failed`` record."""
        self.warm_up(state, device)
        start = time.perf_counter()
        rec = base_record(self.kind, cell, self.cell_identity(cell, identity), self.data_description(state))
        try:
            rec["metrics"] = self.run_cell(cell, state, device, progress)
            rec["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - any failure of one cell is recorded, the grid goes on
            rec["status"] = "failed"
            rec["error"] = f"{type(err).__name__}: {err}"
            rec["traceback"] = traceback.format_exc(limit=4)
        rec["seconds"] = time.perf_counter() - start
        return rec


def base_record(kind: str, cell: GridCell, identity: dict[str, Any], data: str) -> dict[str, Any]:
    return {
        "key": cell.key(kind, identity),
        "axes_key": cell.axes_key(kind),
        "kind": kind,
        "index": cell.index,
        "cell": cell.axes,
        "identity": identity,
        "data": data,
        "env": environment(),
    }


def code_revisions(records: Sequence[dict[str, Any]]) -> list[str]:
    """The distinct code revisions (``env.git``) that produced ``records``, in first-seen order; ``"unrecorded"``
    for a record without one.  More than one means a resumed run mixed code versions under the same keys."""
    revs = [str((r.get("env") or {}).get("git") or "unrecorded") for r in records]
    return list(dict.fromkeys(revs))


def failed_record(
    kind: str, cell: GridCell, identity: dict[str, Any], data: str, error: str, seconds: float = 0.0
) -> dict[str, Any]:
    """A record for a cell whose run did not return (an executor error)."""
    return {**base_record(kind, cell, identity, data), "status": "failed", "error": error, "seconds": seconds}


class ModelDataJob(GridJob):
    """A grid over one source model and one benchmark: its state is ``{"model", "bench"}``, its identity the
    model's and the data's fingerprints with the config keys in ``PARAMS`` (the bench and attack grids)."""

    PARAMS: tuple[str, ...] = ()

    def identity(self, state: Any) -> dict[str, Any]:
        """The model's and data's fingerprints, the config keys in ``PARAMS``, the version and, for method
        entries that read files or source data, their fingerprints by entry (``entry_inputs``)."""
        import tta_norm
        from tta_norm.bench.identity import data_identity, model_identity

        cfg = self.config
        identity = {
            "model": model_identity(cfg.model, cfg.checkpoint, state["model"]),
            "data": data_identity(state["bench"]),
            "params": {k: getattr(cfg, k) for k in self.PARAMS},
            "version": tta_norm.__version__,
        }
        if isinstance(state, dict) and "entry_inputs" in state:  # fingerprinted once, by prepare_entries
            inputs = state["entry_inputs"]
        else:
            inputs = self.entry_inputs(state.get("init_states") if isinstance(state, dict) else None)
        if inputs:
            identity["entry_inputs"] = inputs
        return identity

    def prepare_entries(self) -> dict[str, Any]:
        """The state the method entries need: their ``init_state`` files read once (``init_states``) and the
        fingerprints of everything they read (``entry_inputs``, by entry digest).  A cell uses these states and
        checks the source images it loads against these fingerprints, so its key always names what it ran on."""
        init_states = self.read_entry_files()
        return {"init_states": init_states, "entry_inputs": self.entry_inputs(init_states)}

    def entry_fingerprints(self, cell: GridCell, state: Any) -> dict[str, str] | None:
        """The fingerprints of what ``cell``'s entry reads, as taken by :meth:`prepare_entries`."""
        inputs = state.get("entry_inputs") if isinstance(state, dict) else None
        return (inputs or {}).get(digest(cell.payload.entry.as_dict()))

    def read_entry_files(self) -> dict[str, tuple[str, Any]]:
        """Every ``init_state`` file of the method entries, read once (path -> fingerprint and state,
        :func:`~tta_norm.methods.entries.read_init_state`): the cells use these states, so a file changed
        during the run cannot give results under the old file's key.  An unreadable file is a config error."""
        from tta_norm.methods.entries import read_init_state

        out: dict[str, tuple[str, Any]] = {}
        for entry in self.config.method_entries():
            path = dict(entry.kwargs).get("init_state")
            if isinstance(path, (str, os.PathLike)) and str(path) not in out:
                try:
                    out[str(path)] = read_init_state(path)
                except (FileNotFoundError, ValueError) as err:
                    raise user_error(f"methods: {entry.label}", err) from None
        return out

    def locate_entry_inputs(self) -> None:
        """The dry run's check of what the method entries read (:func:`~tta_norm.methods.entries.
        locate_entry_inputs`): a missing ``init_state`` file or source split is a config error before any run."""
        from tta_norm.methods.entries import locate_entry_inputs

        cfg = self.config
        for entry in cfg.method_entries():
            try:
                locate_entry_inputs(entry.preset, entry.method, dict(entry.kwargs), dataset=cfg.dataset,
                                    data_dir=cfg.data_dir)  # fmt: skip
            except (FileNotFoundError, ValueError) as err:
                raise user_error(f"methods: {entry.label}", err) from None

    def entry_inputs(self, init_states: dict[str, tuple[str, Any]] | None = None) -> dict[str, dict[str, str]]:
        """``{entry digest: fingerprints}`` of the entries that read an ``init_state`` file (the fingerprints of
        ``init_states`` where given), Fisher images or TTN's source split; a missing file is a config error."""
        from tta_norm.methods.entries import entry_inputs

        cfg, out = self.config, {}
        for entry in cfg.method_entries():
            try:
                found = entry_inputs(entry.preset, entry.method, dict(entry.kwargs), dataset=cfg.dataset,
                                     data_dir=cfg.data_dir, init_states=init_states)  # fmt: skip
            except (FileNotFoundError, ValueError) as err:
                raise user_error(f"methods: {entry.label}", err) from None
            if found:
                out[digest(entry.as_dict())] = found
        return out

    def cell_identity(self, cell: GridCell, identity: dict[str, Any]) -> dict[str, Any]:
        """The grid's identity with only this cell's entry inputs (``inputs``): a changed file of one entry
        reruns that entry's cells, not the whole grid."""
        if "entry_inputs" not in identity:
            return identity
        own = identity["entry_inputs"].get(digest(cell.payload.entry.as_dict()))
        base = {k: v for k, v in identity.items() if k != "entry_inputs"}
        return {**base, "inputs": own} if own else base

    def data_description(self, state: Any) -> str:
        return state["bench"].describe()
