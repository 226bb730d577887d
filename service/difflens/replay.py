"""`difflens replay`: re-run the request of an audit record and compare every hash with the record's.

In-process by default: the model is found by the record's model name (--model NAME=DIR, else the shipped default)
or given directly (--model-dir); its weight files must hash to the record's, else nothing runs. The run uses the
record's device, dtype and UNet backend unless --device says otherwise. With --server, it runs as a new job on a
difflens service, on the record's model by name, and the served weights are compared with the record's as rows of
the table. The denoising trajectory, hence the image, is bit-reproducible on the same machine and dtype; DF-RISE
maps of steps whose UNet calls were shared with other jobs (record 'rise_exact' false) can differ in the last bits,
and the table says so.

Re-explaining: explanation flags (--methods, --explain-steps, DF-RISE / DF-CAM options) change what is explained
and keep the rest of the request. Explaining never changes the trajectory, so the image is still checked against
the record; maps are checked where the record has them with the same options, and the rest are new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difflens import audit
from difflens.config import ServiceSettings, Settings
from difflens.engine.options import ExplainOptions, GenerationParams
from difflens.errors import InvalidArgument
from difflens.job_codec import json_type_problem
from difflens.jobs import JobSpec
from difflens.models import config_sha256, weights_sha256

if TYPE_CHECKING:
    from difflens.engine.explain import Explanation

REPLAY_SCHEMA = "difflens.replay/1"


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        record = json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidArgument("AUDIT", f"{p}: no such file") from None
    except (OSError, ValueError) as e:
        raise InvalidArgument("AUDIT", f"{p}: not a readable JSON file ({e})") from None
    if not isinstance(record, dict) or record.get("schema") != audit.SCHEMA:
        got = record.get("schema") if isinstance(record, dict) else type(record).__name__
        raise InvalidArgument("AUDIT", f"{p}: schema {got!r}; expected {audit.SCHEMA!r}")
    for key in ("request", "model", "runtime", "hashes"):
        if key not in record:
            raise InvalidArgument("AUDIT", f"{p}: the record has no {key!r}")
    problem = _record_problem(record)
    if problem:
        raise InvalidArgument("AUDIT", f"{p}: malformed record: {problem}")
    return record


def _record_problem(record: Mapping[str, Any]) -> str | None:
    """What is wrong with the shape of a record's parts that replay reads, or None. Checked before anything runs:
    a wrong type used to end replay in a traceback (exit 1, as for a mismatch), some only after the whole run."""
    def mapping_of_str(value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key in ("request", "model", "runtime", "hashes"):
        if not isinstance(record[key], dict):
            return f"{key}: expected an object, got {type(record[key]).__name__}"
    model, hashes = record["model"], record["hashes"]
    for key in ("name", "folder"):
        if not isinstance(model.get(key, ""), str):
            return f"model.{key}: expected a string"
    for key in ("weights_sha256", "config_sha256"):
        if not mapping_of_str(model.get(key, {})):
            return f"model.{key}: expected an object of file -> sha256 strings"
    image = hashes.get("image", {})
    if not isinstance(image, dict) or not all(isinstance(image.get(k, ""), str) for k in ("rgb_uint8", "png")):
        return "hashes.image: expected an object with rgb_uint8 and png sha256 strings"
    maps = hashes.get("maps", {})
    if not isinstance(maps, dict) or not all(k.isdigit() and mapping_of_str(v) for k, v in maps.items()):
        return "hashes.maps: expected an object of step index -> {map name: sha256}"
    exact = record.get("rise_exact", {})
    if not isinstance(exact, dict) or not all(k.isdigit() and isinstance(v, bool) for k, v in exact.items()):
        return "rise_exact: expected an object of step index -> true or false"
    threads = record["runtime"].get("torch_threads", 1)
    if not (is_int(threads) and threads >= 1):
        return "runtime.torch_threads: expected an integer >= 1"
    resolved = record.get("resolved")
    if resolved is not None:
        if not isinstance(resolved, dict):
            return "resolved: expected an object"
        ts = resolved.get("timesteps")
        if ts is not None and not (isinstance(ts, list) and all(is_int(t) for t in ts)):
            return "resolved.timesteps: expected a list of integers"
        if not isinstance(resolved.get("generation", {}), dict):
            return "resolved.generation: expected an object"
    return None


def _request_path(field: str) -> str:
    """A domain field (InvalidArgument.field) -> where it sits in a record's request: 'seed' -> 'request.params.seed',
    'rise.p' -> 'request.explain.rise.p', 'output.map_dtype' -> 'request.output.map_dtype'."""
    if field.startswith(("rise.", "cam.", "attention.")):
        return f"request.explain.{field}"
    if field.startswith(("explain.", "output.")):
        return f"request.{field}"
    return f"request.params.{field}"


def _blamed(err: InvalidArgument, re_explained: bool) -> InvalidArgument:
    """An error of running the record's request on the model: about one of replay's own flags (--model-dir,
    --device; an explanation flag when re-explaining), as raised; else about the record, named where it sits there
    (a width the model's max_side now refuses was blamed on a --width replay does not have)."""
    explaining = err.field.startswith(("rise.", "cam.", "attention.", "explain."))
    if err.field.startswith("--") or err.field == "AUDIT" or (re_explained and explaining):
        return err
    return InvalidArgument("AUDIT", f"the record's request cannot run on this model: {_request_path(err.field)}: "
                                    f"{err.message}")


def resolve_folder(record: Mapping[str, Any], model_dir: str | None, models: Mapping[str, str]) -> Path:
    name = str(record["model"].get("name", ""))
    if model_dir is not None:
        return Path(model_dir)
    recorded = record["model"].get("folder")
    if not models and isinstance(recorded, str) and (Path(recorded) / "model_index.json").exists():
        return Path(recorded)  # no --model given: where the job read it, if it is here (its weights are checked next)
    folder = models.get(name) if models else ServiceSettings().model_dirs().get(name)
    if folder is None:
        raise InvalidArgument("--model-dir", f"the record's model {name!r} is not configured; pass --model-dir DIR "
                                             f"or --model {name}=DIR")
    return Path(folder)


def check_weights(folder: Path, recorded: Mapping[str, str]) -> None:
    """Raise InvalidArgument('--model-dir') naming every weight file that differs, is missing or is extra."""
    if not (folder / "model_index.json").exists():
        raise InvalidArgument("--model-dir", f"{folder}: not a diffusers model folder (no model_index.json)")
    actual = weights_sha256(folder)
    problems = [f"{f}: sha256 {actual[f][:12]}... != recorded {h[:12]}..."
                for f, h in sorted(recorded.items()) if f in actual and actual[f] != h]
    problems += [f"{f}: missing" for f in sorted(set(recorded) - set(actual))]
    problems += [f"{f}: not in the record" for f in sorted(set(actual) - set(recorded))]
    if problems:
        raise InvalidArgument("--model-dir", f"{folder}: weights differ from the record's: {'; '.join(problems)}")


def runtime_settings(record: Mapping[str, Any], device: str | None, threads: int | None = None) -> Settings:
    """The record's device, dtype, UNet backend and torch thread count (maps depend on each), `device` and
    `threads` overriding theirs."""
    rt = record["runtime"]
    # A Triton server's UNet is the model folder's (start-up checks it): in-process it runs eager, to float noise.
    backend: Any = "eager" if rt.get("unet_backend") == "triton" else rt.get("unet_backend", "eager")
    try:
        settings = Settings(device=device or rt.get("device", "cpu"), dtype=rt.get("dtype", "float32"),
                            unet_backend=backend,
                            threads=threads if threads is not None else rt.get("torch_threads", 0))
    except InvalidArgument as e:
        raise InvalidArgument("AUDIT", f"runtime.{e.field}: {e.message}") from None
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgument("--device", f"the record ran on {settings.device}, which this machine lacks; pass "
                                              "--device cpu (then hashes are not expected to match)")
    return settings


def inexact_rise(item: str, inexact_steps: set[int]) -> bool:
    """Whether table row `item` is a DF-RISE map of a step whose UNet calls were shared with other jobs (the record's
    'rise_exact' false): its last bits may differ on replay, and such a difference is not a failure."""
    return item.startswith("step") and "/rise" in item and int(item[4:7]) in inexact_steps


def format_table(rows: list[tuple[str, str, str, bool]], inexact_steps: set[int]) -> str:
    width = max([len("item")] + [len(r[0]) for r in rows])
    lines = [f"{'item':<{width}}  {'recorded':<14}  {'replayed':<14}  match"]
    for item, a, b, ok in rows:
        note = ""
        if not ok and inexact_rise(item, inexact_steps):
            note = "  (RISE batched with other jobs: last-bit differences expected)"
        lines.append(f"{item:<{width}}  {a[:12]:<14}  {b[:12]:<14}  {'yes' if ok else 'NO'}{note}")
    return "\n".join(lines)


class ReplayFailed(RuntimeError):
    """The replay job did not complete on the server."""


def unchanged_methods(recorded: ExplainOptions, now: ExplainOptions) -> set[str]:
    """The methods run now with exactly the record's options: only their maps can be compared."""
    pairs = (("rise", recorded.rise, now.rise), ("cam", recorded.cam, now.cam),
             ("attn", recorded.attention, now.attention))
    return {m for m, a, b in pairs if a is not None and a == b}


def run_local(record: Mapping[str, Any], spec: JobSpec, *, model_dir: str | None, models: Mapping[str, str],
              device: str | None, threads: int | None = None, echo: Callable[[str], None] = print) \
        -> tuple[Explanation, dict[str, Any], dict[str, str]]:
    """Run `spec` in-process on the record's model (its weights checked first), with the record's runtime (device,
    dtype, backend, torch threads; `device` and `threads` override theirs) -> (explanation, its hashes, the folder's
    config hashes). The process's torch thread count is restored afterwards."""
    folder = resolve_folder(record, model_dir, dict(models))
    check_weights(folder, record["model"].get("weights_sha256", {}))
    configs = config_sha256(folder)
    settings = runtime_settings(record, device, threads)

    import torch

    from difflens.engine import families
    from difflens.engine.explain import run_explanation
    from difflens.engine.loading import load_model
    from difflens.render.outputs import image_png

    model = load_model(folder, device=settings.device, dtype=settings.torch_dtype)
    before = torch.get_num_threads()
    try:
        echo(f"difflens: replaying on {settings.device}, {settings.dtype}, {settings.unet_backend}, "
             f"{threads_text(settings.apply_threads())}{recorded_threads(record, threads)}")
        exp = run_explanation(model, spec.params, spec.explain, runner=families.runner(model, settings.unet_backend))
    finally:
        torch.set_num_threads(before)
    return exp, audit.explanation_hashes(exp, image_png(exp.image)), configs


def threads_text(n: Any) -> str:
    return f"{n} torch thread{'' if n == 1 else 's'}"


def recorded_threads(record: Mapping[str, Any], threads: int | None) -> str:
    """' (the record's: N)' when --threads overrides the record's count, else ''."""
    recorded = record["runtime"].get("torch_threads")
    return f" (the record's: {recorded})" if threads is not None and recorded is not None and recorded != threads \
        else ""


def run_remote(record: Mapping[str, Any], spec: JobSpec, server: str,
               client: Mapping[str, Any] | None = None) -> tuple[Explanation, dict[str, Any]]:
    """Run `spec` as a new job on a difflens server, on the record's model by name -> (explanation, the new job's
    audit record); `client`: DifflensClient's connection arguments (api_key, TLS files). The caller compares
    weights: the server's may differ. grpc.RpcError and ReplayFailed propagate."""
    from difflens.client import DifflensClient, explanation_from_events
    from difflens.jobs import Completed

    # A fresh job: the record's idempotency key would hand back the recorded job, and its deadline has passed.
    spec = dataclasses.replace(spec, model=str(record["model"].get("name", spec.model)), deadline=None,
                               idempotency_key="", caller="")
    with DifflensClient(server, **(client or {})) as connection:
        stream = connection.explain(spec)
        for _ in stream:
            pass
    if not isinstance(stream.result, Completed):
        raise ReplayFailed(f"job {stream.job_id} on {server} did not complete: {stream.result}")
    return explanation_from_events(stream.events), json.loads(stream.result.audit_json)


def file_rows(kind: str, recorded: Mapping[str, str], now: Mapping[str, str]) -> list[tuple[str, str, str, bool]]:
    return [(f"{kind}/{f}", recorded.get(f, "-"), now.get(f, "-"), recorded.get(f) == now.get(f))
            for f in sorted(set(recorded) | set(now))]


def config_rows(record: Mapping[str, Any], now: Mapping[str, str]) -> list[tuple[str, str, str, bool]]:
    """The model's config files against the record's (a record made before they were recorded: none). A changed
    UNet config or scheduler config changes the result as surely as a weight does, and the rows say which."""
    recorded = record["model"].get("config_sha256")
    return file_rows("config", recorded, now) if recorded else []


def tell_config_change(rows: list[tuple[str, str, str, bool]], echo: Callable[[str], None]) -> None:
    changed = [item.split("/", 1)[1] for item, *_, ok in rows if item.startswith("config/") and not ok]
    if changed:
        echo(f"difflens: the model's config files differ from the record's ({', '.join(changed)}): the results "
             "are not expected to match")


def replay(path: str | os.PathLike[str], *, model_dir: str | None = None, models: Mapping[str, str] | None = None,
           device: str | None = None, out: str | os.PathLike[str] | None = None,
           explain: Callable[[ExplainOptions], ExplainOptions] | None = None, server: str | None = None,
           threads: int | None = None, echo: Callable[[str], None] = print,
           client: Mapping[str, Any] | None = None) -> int:
    """Re-run the record at `path`; print the per-item table; 0 if every compared hash matches (or differs only in
    a DF-RISE map the record says was batched with other jobs), 1 if not.

    In-process by default; with `server` (HOST:PORT) as a new job on that difflens service (connected with
    `client`: DifflensClient's api_key and TLS arguments), whose weights are then compared with the record's as
    items of the table. `explain` (re-explaining) maps the record's
    explanation options to the ones to run: the generation is the record's, so the image must still match; maps
    are compared where the step was explained in both runs by a method with unchanged options, and the others
    are new (written to `out`, which re-explaining requires). With `out`, replay.json beside the outputs lists
    every compared item and every new map's hash (and, from a server, audit.json is the new job's record).
    Bad input (file, record, model folder, weights, options) raises InvalidArgument before anything runs."""
    record = read_record(path)
    problem = json_type_problem(JobSpec, record["request"], "request")
    if problem:
        raise InvalidArgument("AUDIT", f"the record's request is malformed: {problem}")
    try:
        spec = JobSpec.from_json(json.dumps(record["request"]))
    except InvalidArgument as e:  # a value of the recorded request: not one of this command's flags
        raise InvalidArgument("AUDIT", f"the record's request is malformed: {_request_path(e.field)}: {e.message}") \
            from None
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument("AUDIT", f"the record's request is malformed: {e}") from None
    options = spec.explain if explain is None else explain(spec.explain)
    re_explained = options != spec.explain
    makes_maps = any(m is not None for m in (options.rise, options.cam, options.attention))
    if re_explained and makes_maps and out is None:
        raise InvalidArgument("--out", "re-explaining makes maps the record does not have; give --out DIR")
    run_spec = dataclasses.replace(spec, params=pinned_generation(record, spec.params), explain=options)
    rows: list[tuple[str, str, str, bool]] = []
    companions: dict[str, bytes] = {}
    inexact = {int(k) for k, exact in record.get("rise_exact", {}).items() if not exact}
    try:
        if server is None:
            exp, replayed, configs = run_local(record, run_spec, model_dir=model_dir, models=models or {},
                                               device=device, threads=threads, echo=echo)
        else:
            exp, new_record = run_remote(record, run_spec, server, client)
    except InvalidArgument as e:
        raise _blamed(e, re_explained) from None
    if server is None:
        rows += config_rows(record, configs)
    else:
        replayed = new_record["hashes"]
        rows += file_rows("weights", record["model"].get("weights_sha256", {}), new_record["model"]["weights_sha256"])
        rows += config_rows(record, new_record["model"].get("config_sha256", {}))
        inexact |= {int(k) for k, exact in new_record.get("rise_exact", {}).items() if not exact}
        companions["audit.json"] = audit.dumps(new_record).encode("utf-8")
        echo(f"difflens: ran as job {new_record.get('job_id')} on {server} ({runtime_line(new_record)}; "
             f"recorded: {runtime_line(record)})")
        if runtimes_differ(new_record, record):
            echo("difflens: the server ran it on another runtime than the record's: the maps are not expected to "
                 "match bit for bit")
    recorded, new = dict(record["hashes"]), dict[str, str]()
    if re_explained:
        recorded["maps"], replayed["maps"], new = audit.comparable_maps(
            recorded.get("maps", {}), replayed["maps"], unchanged_methods(spec.explain, options))
    replayed_params = exp.params if server is None else new_record.get("resolved") or {}
    tell_config_change(rows, echo)
    rows += timestep_rows((record.get("resolved") or {}).get("timesteps"), replayed_params.get("timesteps"), echo)
    rows += audit.compare_hashes(recorded, replayed)
    echo(format_table(rows, inexact))
    expected = sum(not ok and inexact_rise(item, inexact) for item, *_, ok in rows)
    mismatches = sum(not ok for *_, ok in rows) - expected
    job = record.get("job_id", "?")
    echo(f"difflens: replay of job {job}: {len(rows) - mismatches - expected}/{len(rows)} items match"
         + (f"; {expected} DF-RISE map(s) of steps batched with other jobs differ, which the record allows"
            if expected else ""))
    if re_explained:
        echo(f"difflens: re-explained: {len(new)} maps the record does not have (new methods, options or steps)")
    if out is not None:
        from difflens.render import write_outputs

        summary = {"schema": REPLAY_SCHEMA, "audit": str(path), "job_id": job, "server": server,
                   "re_explained": re_explained, "explain": json.loads(run_spec.to_json())["explain"],
                   "items": [{"item": i, "recorded": a, "replayed": b, "match": ok} for i, a, b, ok in rows],
                   "mismatches": mismatches, "new_maps": new}
        companions["replay.json"] = json.dumps(summary, indent=2).encode("utf-8")
        written = write_outputs(exp, out, companions=companions)
        echo(f"difflens: wrote {len(written)} files to {out}")
    return 0 if mismatches == 0 else 1


# Request fields the model's defaults fill in when a request leaves them unset.
DEFAULTED = ("steps", "guidance_scale", "width", "height", "scheduler")


def pinned_generation(record: Mapping[str, Any], params: GenerationParams) -> GenerationParams:
    """The record's request with every field it left to the model's defaults set to what the record resolved it
    to: the model folder's difflens.json may have changed since (it is not among the hashed weights)."""
    resolved = (record.get("resolved") or {}).get("generation")
    if not isinstance(resolved, Mapping):
        return params  # an older record: the defaults of today's folder
    return dataclasses.replace(params, **{f: resolved[f] for f in DEFAULTED
                                          if getattr(params, f) is None and resolved.get(f) is not None})


def timestep_rows(recorded: Any, replayed: Any, echo: Callable[[str], None]) -> list[tuple[str, str, str, bool]]:
    """One row comparing the timestep lists (hashed like the other items), and both lists spelled out when they
    differ: the model's scheduler config (not hashed with the weights) may space the same steps differently now."""
    if not isinstance(recorded, list) or not isinstance(replayed, list):
        return []
    a, b = (hashlib.sha256(json.dumps([int(t) for t in ts]).encode()).hexdigest() for ts in (recorded, replayed))
    if a != b:
        echo(f"difflens: the timesteps differ (scheduler config changed?): recorded {recorded}, now {replayed}")
    return [("timesteps", a, b, a == b)]


def runtimes_differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two records ran on runtimes whose results may differ: device, dtype, backend, and on a CPU the
    thread count (where both records have it)."""
    ra, rb = a.get("runtime", {}), b.get("runtime", {})
    if any(ra.get(k) != rb.get(k) for k in ("device", "dtype", "unet_backend")):
        return True
    ta, tb = ra.get("torch_threads"), rb.get("torch_threads")
    return ra.get("device") == "cpu" and ta is not None and tb is not None and ta != tb


def runtime_line(record: Mapping[str, Any]) -> str:
    rt = record.get("runtime", {})
    return (f"{rt.get('device', '?')}, {rt.get('dtype', '?')}, {rt.get('unet_backend', '?')}, "
            f"{threads_text(rt.get('torch_threads', '?'))}")
