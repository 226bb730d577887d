"""write_outputs: an Explanation -> the output folder (pictures, npz, params.json, report.html).

Everything is encoded in memory first, then written into a temporary folder beside `out_dir` and moved into
place only when every file exists, so an error leaves no half-written output (and an existing folder untouched).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from difflens.render import compose, report
from difflens.render.maps import as_array

if TYPE_CHECKING:
    from difflens.engine.explain import Explanation

FIXED_NAMES = ("image.png", "params.json", "report.html", "explanation.npz", "attn_tokens.png", "overview.png")
# Written beside the outputs by the commands that have them: a served job's audit record, replay's comparison.
COMPANION_NAMES = ("audit.json", "replay.json")


def all_output_names() -> set[str]:
    """Every file name write_outputs can produce (used to clear a previous run's leftovers)."""
    per_method = {f"strip_{m}.png" for m in compose.METHODS} | {f"{m}.gif" for m in compose.METHODS}
    return set(FIXED_NAMES) | set(COMPANION_NAMES) | per_method


def step_key(index: int, name: str) -> str:
    """npz key of one map: "step003/rise", "step003/cam/up_blocks.1.resnets.0"."""
    return f"step{index:03d}/{name}"


def npz_bytes(exp: Explanation) -> bytes:
    """Every map of every explained step (float32, shapes as in StepExplanation), plus timesteps (n,),
    explained_steps (S,), explained_timesteps (S,), tokens (T,) str and image (H, W, 3) uint8."""
    arrays: dict[str, np.ndarray] = {
        "timesteps": np.asarray(exp.timesteps, np.int64),
        "explained_steps": np.asarray([s.index for s in exp.steps], np.int64),
        "explained_timesteps": np.asarray([s.timestep for s in exp.steps], np.int64),
        "tokens": np.asarray(exp.tokens, dtype=np.str_),
        "image": np.asarray(exp.image, np.uint8),
    }
    for s in exp.steps:
        for name, value in s.maps.items():
            arrays[step_key(s.index, name)] = as_array(value)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def params_json(exp: Explanation) -> bytes:
    return (json.dumps(exp.params, indent=2, default=str) + "\n").encode("utf-8")


def image_png(image: np.ndarray) -> bytes:
    """image: (H, W, 3) uint8 -> PNG bytes: image.png's, which audit records hash (a worker's, a local run's,
    replay's)."""
    from PIL import Image

    return compose.png_bytes(Image.fromarray(np.asarray(image, np.uint8)))


def render_files(exp: Explanation) -> dict[str, bytes]:
    """File name -> encoded content, for everything the explanation has. No I/O."""
    files: dict[str, bytes] = {"image.png": image_png(exp.image)}
    for m in compose.methods_present(exp):
        tiles = compose.step_tiles(exp, m)
        files[f"strip_{m}.png"] = compose.png_bytes(compose.strip(tiles, label=compose.ROW_LABELS[m]))
        files[f"{m}.gif"] = compose.gif_bytes(tiles)
    picture = compose.overview(exp)
    if picture is not None:
        files["overview.png"] = compose.png_bytes(picture)
    tokens = compose.token_grid(exp)
    if tokens is not None:
        files["attn_tokens.png"] = compose.png_bytes(tokens)
    if exp.steps:
        files["explanation.npz"] = npz_bytes(exp)
    files["params.json"] = params_json(exp)
    files["report.html"] = report.report_html(exp, files).encode("utf-8")
    return files


def out_folder_problem(out: Path) -> str | None:
    """Why `out` cannot take the outputs (it exists and is not a folder), or None: the commands ask before any
    work (naming --out), write_outputs again when it writes."""
    return f"{out} exists and is not a folder" if out.exists() and not out.is_dir() else None


def write_outputs(explanation: Explanation, out_dir: str | os.PathLike[str],
                  companions: Mapping[str, bytes] | None = None) -> dict[str, Path]:
    """Write every output of `explanation` into `out_dir` (created if missing). Returns file name -> path.

    Always image.png, params.json, report.html; with explained steps also explanation.npz and, per method
    present, strip_<method>.png and <method>.gif, and with any method overview.png; with attention maps
    attn_tokens.png; `companions` (names from COMPANION_NAMES -> bytes) in the same all-or-nothing write.
    Files of a previous run in `out_dir` with these names are replaced or, when this run does not produce them, removed.
    """
    out = Path(out_dir)
    problem = out_folder_problem(out)
    if problem:
        raise NotADirectoryError(problem)
    unknown = set(companions or {}) - set(COMPANION_NAMES)
    if unknown:
        raise ValueError(f"companion files {sorted(unknown)}; allowed: {', '.join(COMPANION_NAMES)}")
    files = {**render_files(explanation), **(companions or {})}
    created = _first_missing_ancestor(out.absolute().parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside a new folder (renamed into place in one step), inside an existing one: `out` may be a mount point
    # (a container volume), and files moved into it from outside would cross filesystems (EXDEV).
    base = out if out.is_dir() else out.parent
    tmp = base / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would become the output folder's
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        _move_into_place(tmp, out, set(files))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return {name: out / name for name in files}


def _first_missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (to remove again on failure), or None."""
    missing = None
    while not path.exists():
        missing = path
        path = path.parent
    return missing


def _move_into_place(tmp: Path, out: Path, names: set[str]) -> None:
    if not out.exists():
        tmp.rename(out)  # one atomic step
        return
    for name in sorted(names):
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    for stale in all_output_names() - names:
        (out / stale).unlink(missing_ok=True)
