"""The ``moe-eplb`` command.

Heavy imports (numpy, numba, matplotlib) happen inside the commands, so ``--help`` is fast and
importing this module never pulls in torch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain help: rich's would take "[layers, experts]" for markup and print "<bool>" after
    # flags, which take no value.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="moe-eplb: Mixture-of-Experts expert-parallel load balancing, from planner to operator.",
)
console = Console()
error_console = Console(stderr=True)


def say(line: str) -> None:
    """One line on stderr, as written (no markup, no wrapping): errors and notes go there, so
    stdout stays the command's output."""
    error_console.print(line, markup=False, highlight=False, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print a one-line error naming the problem and exit with status 2."""
    say(f"error: {message}")
    raise typer.Exit(code=2)


def note(message: str) -> None:
    say(f"note: {message}")


def check_output_folder(flag: str, path: Path | None) -> None:
    """Exit 2 before any work when ``path`` is to be written into a folder that is not there."""
    if path is not None and not path.parent.is_dir():
        fail(f"{flag}: folder {path.parent} does not exist")


def require_extras(command: str) -> None:
    """Exit 2 naming the pip extra ``command`` needs when its modules are not installed."""
    from moe_operator.extras import missing_extras_message

    message = missing_extras_message(command)
    if message is not None:
        fail(message)


def load_deployment(file: Path) -> Any:
    """A valid MoEDeployment from FILE, or exit 2 naming the first problem's field."""
    import yaml

    from moe_operator.api import MoEDeployment
    from moe_operator.validation import problems

    try:
        document = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        fail(f"{file}: cannot read: {exc}")
    found = problems(document)
    if found:
        fail(f"{file}: {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))
    return MoEDeployment.model_validate(document)


@app.callback()
def main_callback() -> None:
    """Mixture-of-Experts expert-parallel load balancing."""


@app.command()
def plan(
    loads: Path = typer.Option(
        ..., "--loads", help="Expert loads [layers, experts]: .npy or .json."
    ),
    gpus: int = typer.Option(..., "--gpus", help="Number of GPUs (EP ranks)."),
    slots: int = typer.Option(
        ..., "--slots", help="Physical expert slots per layer, over all GPUs."
    ),
    nodes: int = typer.Option(
        1, "--nodes", help="Number of nodes (node-aware placement when > 1)."
    ),
    groups: int = typer.Option(1, "--groups", help="Number of expert groups (DeepSeek-style)."),
    policy: str = typer.Option("balanced", "--policy", help="Placement policy name."),
    previous: Path | None = typer.Option(
        None,
        "--previous",
        help="Previous placement (the --out format) to start from / compare with.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write phy2log, log2phy, replica_count here."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    plot: Path | None = typer.Option(
        None, "--plot", help="PNG: per-GPU load before and after, for the worst layer."
    ),
    shares: bool = typer.Option(
        False,
        "--shares",
        help="Also fit replica shares (how each expert's tokens split over its replicas) to "
        "the loads; --out then carries them, and the worker routes by them.",
    ),
) -> None:
    """Compute an expert placement for a load file and report its balance."""
    from moe_worker.eplb import loadfile
    from moe_worker.eplb.policy import (
        POLICIES,
        Placement,
        PlacementInputError,
        UnknownPolicyError,
        balancedness_bound,
        compute_placement,
        default_placement,
        layer_balancedness,
        moved_copies,
        overall_balancedness,
        worst_layer_balancedness,
    )

    if policy not in POLICIES:
        fail(str(UnknownPolicyError(policy)))
    check_output_folder("--out", out)
    check_output_folder("--plot", plot)
    if plot is not None and plot.suffix.lower() != ".png":
        fail(f"--plot: must name a .png file, got {plot.name!r}")
    try:
        weight = loadfile.read_loads(loads)
    except (OSError, ValueError) as exc:
        fail(f"--loads {loads}: {exc}")
    before: Placement | None = None
    if previous is not None:
        try:
            before = Placement.from_json(json.loads(previous.read_text()))
        except (OSError, ValueError) as exc:
            fail(f"--previous {previous}: {exc}")
    options = {"num_physical": slots, "num_gpus": gpus, "num_groups": groups, "num_nodes": nodes}
    try:
        started = time.perf_counter()
        placement = compute_placement(policy, weight, previous=before, **options)
        if shares:
            from moe_worker.eplb.policy.shares import fit_shares

            placement = fit_shares(weight, placement, gpus)
        runtime = time.perf_counter() - started
    except PlacementInputError as exc:
        flag = {
            "weight": "--loads",
            "num_physical": "--slots",
            "num_gpus": "--gpus",
            "num_groups": "--groups",
            "num_nodes": "--nodes",
            "previous": "--previous",
        }[exc.field]
        fail(f"{flag}: {exc.rule}")

    num_layers, num_logical = weight.shape
    if before is None:
        baseline, baseline_name, baseline_gpus = (
            default_placement(num_layers, num_logical, slots),
            "static (slot p holds expert p mod E)",
            gpus,
        )
    else:
        baseline, baseline_name = before, "previous"
        baseline_gpus = before.num_physical // (slots // gpus)
    before_balance = layer_balancedness(weight, baseline, baseline_gpus)
    after_balance = layer_balancedness(weight, placement, gpus)
    bound = balancedness_bound(weight, slots, gpus)
    moved = moved_copies(baseline, placement, baseline_gpus, gpus) if before is not None else None

    report: dict[str, Any] = {
        "policy": policy,
        "shares": shares,
        "layers": num_layers,
        "experts": num_logical,
        "slots": slots,
        "gpus": gpus,
        "nodes": nodes,
        "groups": groups,
        "baseline": baseline_name,
        "balancedness_before": overall_balancedness(before_balance),
        "balancedness_after": overall_balancedness(after_balance),
        "balancedness_bound": overall_balancedness(bound),
        "worst_layer_after": worst_layer_balancedness(after_balance),
        "moved_copies": int(moved.sum()) if moved is not None else None,
        "moved_fraction_max_layer": float((moved / slots).max()) if moved is not None else None,
        "runtime_s": runtime,
    }
    if out is not None:
        out.write_text(json.dumps(placement.to_json()))
        report["out"] = str(out)
    if plot is not None:
        from moe_worker.eplb.plot import plot_worst_layer

        plot_worst_layer(weight, baseline, baseline_gpus, placement, gpus, plot)
        report["plot"] = str(plot)

    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    table = Table(
        title=(
            f"moe-eplb plan: {policy}, {num_layers} layers x {num_logical} experts"
            f" -> {slots} slots on {gpus} GPUs"
        )
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"balancedness before ({baseline_name})", f"{report['balancedness_before']:.4f}")
    table.add_row("balancedness after", f"{report['balancedness_after']:.4f}")
    table.add_row("worst layer after", f"{report['worst_layer_after']:.4f}")
    table.add_row("upper bound", f"{report['balancedness_bound']:.4f}")
    table.add_row(
        "moved copies",
        "-"
        if moved is None
        else f"{report['moved_copies']} (max {report['moved_fraction_max_layer']:.1%} of a layer)",
    )
    table.add_row("runtime (includes loading compiled kernels)", f"{runtime * 1e3:.1f} ms")
    console.print(table)
    for key in ("out", "plot"):
        if key in report:
            console.print(f"{key}: {report[key]}")


@app.command()
def worker(
    config: Path = typer.Option(..., "--config", help="Worker config (YAML or JSON)."),
    steps: int | None = typer.Option(None, "--steps", help="Override the config's steps."),
) -> None:
    """Run one EP rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment)."""
    require_extras("worker")
    from moe_worker.main import main as worker_main

    argv = ["--config", str(config)] + ([] if steps is None else ["--steps", str(steps)])
    raise typer.Exit(code=worker_main(argv))


@app.command()
def verify(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="transformers MoE checkpoint directory."
    ),
    ep_size: int = typer.Option(..., "--ep-size", help="Number of local EP ranks."),
    placement: str = typer.Option("balanced", "--placement", help="random or balanced."),
    input_path: Path = typer.Option(..., "--input", help="Hidden states [T, H] (.npy)."),
    output_path: Path = typer.Option(..., "--output", help="Where to write outputs [L, T, H]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random placement."),
) -> None:
    """Apply every MoE layer of a checkpoint under EP to the input; write the outputs."""
    require_extras("verify")
    check_output_folder("--output", output_path)
    from moe_worker.model.hf_source import CheckpointError
    from moe_worker.verify import verify as run_verify

    try:
        shape = run_verify(checkpoint, ep_size, placement, input_path, output_path, seed)
    except (CheckpointError, ValueError, OSError) as exc:
        fail(str(exc))
    console.print(f"wrote {output_path}: outputs {list(shape)} (layers, tokens, hidden)")


@app.command()
def validate(
    files: list[Path] = typer.Argument(
        ..., metavar="FILE", help="MoEDeployment YAML files (multi-document ok)."
    ),
) -> None:
    """Check MoEDeployment files; one line per problem, naming the field path."""
    import yaml

    from moe_operator.validation import assumptions, problems

    failed = False
    for file in files:
        try:
            documents = list(yaml.safe_load_all(file.read_text()))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            say(f"error: {file}: cannot read: {exc}")
            failed = True
            continue
        if not any(d is not None for d in documents):
            say(f"error: {file}: no MoEDeployment in it (empty)")
            failed = True
            continue
        for index, document in enumerate(d for d in documents if d is not None):
            found = problems(document)
            where = f"{file}" + (f" (document {index + 1})" if len(documents) > 1 else "")
            for problem in found:
                say(f"error: {where}: {problem}")
            if found:
                failed = True
            else:
                console.print(f"{where}: valid", markup=False, highlight=False)
                for line in assumptions(document):
                    note(f"{where}: {line}")
    if failed:
        raise typer.Exit(code=1)


@app.command()
def render(
    file: Path = typer.Argument(..., metavar="FILE", help="A MoEDeployment YAML file."),
    pod_monitor: bool = typer.Option(False, "--pod-monitor", help="Include the PodMonitor."),
) -> None:
    """Print the child manifests the operator would create for FILE, as YAML."""
    import secrets

    import yaml

    from moe_operator.builders import children
    from moe_operator.validation import assumptions

    deployment = load_deployment(file)
    for line in assumptions(deployment.model_dump(by_alias=True, exclude_unset=True)):
        note(f"{file}: {line}")
    # The operator generates the control token once; a fresh one stands in for it here.
    manifests = children(deployment, secrets.token_urlsafe(32), with_pod_monitor=pod_monitor)
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False))


@app.command("run")
def run_local(
    file: Path = typer.Argument(..., metavar="FILE", help="A MoEDeployment YAML file."),
    duration: float | None = typer.Option(
        None,
        "--duration",
        help="Seconds to run (Ctrl-C stops); default: until the workload's durationS + 30 "
        "after its traffic starts, or 120 for the simulator.",
    ),
    port: int = typer.Option(
        0, "--port", help="Port of the deployment's endpoint (its /v1 API; 0: a free one)."
    ),
    report: Path = typer.Option(
        Path("out/run.json"), "--report", help="JSON timeline; the PNG plot goes beside it."
    ),
    prometheus: str | None = typer.Option(
        None, "--prometheus", help="Read metrics from this Prometheus instead of scraping."
    ),
    device: str = typer.Option(
        "auto",
        "--device",
        help="cpu, cuda (local GPUs, one per rank), or auto: cuda when there are enough.",
    ),
    check_outputs: bool = typer.Option(
        False,
        "--check-outputs",
        help="Check answers: greedy check requests through the endpoint, compared at the end "
        "with the whole model in one process (the simulator: every step's output).",
    ),
) -> None:
    """Run FILE on this machine: ranks as local processes, the operator's policy loop."""
    require_extras("run")
    import asyncio

    from moe_operator.runtime.local import LocalGpuError, choose_device, visible_gpus
    from moe_operator.runtime.local import run as run_deployment

    if duration is not None and duration <= 0:
        fail("--duration: must be > 0 seconds")
    if not 0 <= port < 65536:
        fail(f"--port: must be between 0 and 65535, not {port}")
    if device not in ("cpu", "cuda", "auto"):
        fail(f"--device: must be cpu, cuda or auto, not {device!r}")
    deployment = load_deployment(file)
    if device == "auto":
        device, why = choose_device(device, deployment, visible_gpus())
        console.print(f"device: {why}")
    try:
        timeline = asyncio.run(
            run_deployment(
                deployment, duration, report, prometheus, device, True, check_outputs, port
            )
        )
    except LocalGpuError as exc:
        fail(str(exc))
    if timeline.failure is not None:
        first, *rest = timeline.failure.splitlines()
        say(f"error: {file}: {first}")
        for line in rest:  # the pod's own last lines
            say(line)
        raise typer.Exit(code=1)
    remaps = sum(a["action"] == "remap" for a in timeline.actions)
    resizes = sum(a["action"] == "resize" for a in timeline.actions)
    console.print(
        f"{len(timeline.points)} snapshots, {remaps} remaps, {resizes} resizes, "
        f"{timeline.restarts} pod restarts; wrote {report} and {report.with_suffix('.png')}"
    )
    traffic = timeline.traffic
    if traffic is not None:
        console.print(
            f"requests: {traffic['requests_completed']} done, {traffic['requests_failed']} "
            f"failed; {traffic['requests_per_s']:.1f} requests/s, "
            f"{traffic['output_tokens_per_s']:.0f} output tokens/s; TTFT p50/p99 "
            f"{traffic.get('ttft_p50_ms')}/{traffic.get('ttft_p99_ms')} ms"
        )
    if check_outputs:
        if timeline.checks is not None:  # serving: check requests vs the reference
            checked = timeline.checks["checked"]
            wrong = len(timeline.checks["mismatches"]) + len(timeline.checks["errors"])
            what = "answers checked against the single-process reference"
        else:  # the simulator: every step's output vs the dense reference
            checked = sum(r.get("outputsChecked", 0) for r in timeline.rank_summaries)
            wrong = sum(r.get("outputMismatches", 0) for r in timeline.rank_summaries)
            what = "outputs checked against the dense reference"
        console.print(f"{what}: {checked}, {wrong} differ or failed")
        if wrong or not checked:
            raise typer.Exit(code=1)


@app.command()
def serve(
    model_dir: Path = typer.Argument(
        ..., metavar="MODEL_DIR", help="A transformers checkpoint directory."
    ),
    ep_size: int = typer.Option(1, "--ep-size", help="EP ranks (local processes)."),
    port: int = typer.Option(8000, "--port", help="Port of the API (0: a free one)."),
    device: str = typer.Option(
        "auto", "--device", help="cpu, cuda (one local GPU per rank), or auto: cuda if enough."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="Worker config in the ConfigMap's schema (eplb.windowSize...)."
    ),
    draft: Path | None = typer.Option(
        None,
        "--draft",
        metavar="MODEL_DIR",
        help="A speculative draft checkpoint (same tokenizer); its MoE layers are balanced too.",
    ),
    speculative_tokens: int | None = typer.Option(
        None, "--speculative-tokens", help="Tokens the draft proposes per step (default 3)."
    ),
) -> None:
    """Serve MODEL_DIR at http://127.0.0.1:PORT/v1 (OpenAI-compatible), EPLB on."""
    require_extras("serve")
    import signal
    import threading

    import yaml
    from pydantic import ValidationError

    from moe_operator.runtime.local import visible_gpus
    from moe_operator.runtime.serve import ServeError
    from moe_operator.runtime.serve import serve as serve_model

    if ep_size < 1:
        fail("--ep-size: must be >= 1")
    if not 0 <= port < 65536:
        fail("--port: must be 0..65535")
    if device not in ("cpu", "cuda", "auto"):
        fail(f"--device: must be cpu, cuda or auto, not {device!r}")
    if speculative_tokens is not None and draft is None:
        fail("--speculative-tokens: needs --draft")
    base = None
    if config is not None:
        try:
            base = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            fail(f"--config {config}: {exc}")
        if not isinstance(base, dict):
            fail(f"--config {config}: must be a mapping (the worker config's schema)")
    gpus = visible_gpus()
    if device == "auto":
        device = "cuda" if len(gpus) >= ep_size else "cpu"
    if device == "cuda" and len(gpus) < ep_size:
        fail(f"--device cuda: {ep_size} ranks need {ep_size} GPUs, {len(gpus)} visible")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        codes = serve_model(
            model_dir,
            ep_size,
            port,
            device,
            base,
            gpus[:ep_size] if device == "cuda" else None,
            console.print,
            stop,
            draft=draft,
            speculative_tokens=speculative_tokens,
        )
    except ServeError as exc:
        fail(str(exc))
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"--config: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    except OSError as exc:
        fail(str(exc))
    console.print(f"stopped; rank exit codes {codes}")


# bench-serve's options, by the TrafficConfig field they set (for one-line errors)
TRAFFIC_OPTIONS = {
    "durationS": "--duration",
    "maxRequests": "--requests",
    "concurrency": "--concurrency",
    "rateProfile": "--rate-profile",
    "promptWords": "--prompt-words/--prompt-dist",
    "outputTokens": "--output-tokens/--output-dist",
    "topics": "--topics",
    "topicSkew": "--skew",
    "driftPeriodS": "--drift-period",
    "seed": "--seed",
}


def parse_rate_profile(text: str) -> list[dict[str, float]]:
    """``"0:2,30:8,60:2"`` -> [{atS: 0, requestsPerS: 2}, ...]; exits 2 naming the bad part."""
    points = []
    for part in text.split(","):
        at, sep, rate = part.partition(":")
        try:
            if not sep:
                raise ValueError
            points.append({"atS": float(at), "requestsPerS": float(rate)})
        except ValueError:
            fail(f"--rate-profile: {part!r} is not SECONDS:REQUESTS_PER_S (e.g. 0:2,30:8)")
    return points


@app.command("bench-serve")
def bench_serve(
    url: str = typer.Argument(
        ..., metavar="URL", help="Base URL of an OpenAI-compatible server (.../v1 ok)."
    ),
    model: str | None = typer.Option(None, "--model", help="Model id (default: the first listed)."),
    concurrency: int | None = typer.Option(
        None, "--concurrency", help="Requests in flight at most (closed loop without a rate)."
    ),
    rate: float | None = typer.Option(None, "--rate", help="Poisson arrivals, requests/s."),
    rate_profile: str | None = typer.Option(
        None, "--rate-profile", help="Rate over time, SECONDS:RATE,... (e.g. 0:2,30:8,60:2)."
    ),
    duration: float = typer.Option(30.0, "--duration", help="Seconds to send requests for."),
    requests: int | None = typer.Option(None, "--requests", help="Stop after this many."),
    prompt_words: int = typer.Option(32, "--prompt-words", help="Mean prompt length, words."),
    prompt_dist: str = typer.Option("fixed", "--prompt-dist", help="fixed, uniform, lognormal."),
    output_tokens: int = typer.Option(32, "--output-tokens", help="Mean max_tokens."),
    output_dist: str = typer.Option("fixed", "--output-dist", help="fixed, uniform, lognormal."),
    topics: int = typer.Option(8, "--topics", help="Topics in the prompt mix."),
    skew: float = typer.Option(1.2, "--skew", help="Zipf exponent of topic popularity."),
    drift_period: float | None = typer.Option(
        None, "--drift-period", help="Seconds per rotation of the hot topic."
    ),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--stop-at-eos", help="Fixed lengths."),
    seed: int = typer.Option(0, "--seed", help="Seed of arrivals, lengths and prompts."),
    out: Path | None = typer.Option(None, "--out", help="Write the JSON report here too."),
) -> None:
    """Load-test an OpenAI-compatible endpoint (this project's, vLLM, SGLang): streamed
    completions, a live table, and a JSON report of req/s, tokens/s, TTFT, ITL, failures."""
    require_extras("bench-serve")
    check_output_folder("--out", out)
    import asyncio

    import httpx
    from pydantic import ValidationError
    from rich.live import Live

    from moe_operator.loadgen.display import progress_line, progress_table
    from moe_operator.loadgen.runner import run_traffic
    from moe_operator.loadgen.stats import summarize
    from moe_worker.config import TrafficConfig

    if rate is not None and rate_profile is not None:
        fail("--rate and --rate-profile: give one of them")
    profile = parse_rate_profile(rate_profile) if rate_profile else []
    if rate is not None:
        profile = [{"atS": 0.0, "requestsPerS": rate}]
    wire: dict[str, Any] = {
        "durationS": duration,
        "maxRequests": requests,
        "concurrency": concurrency,
        "rateProfile": profile,
        "promptWords": {"mean": prompt_words, "kind": prompt_dist},
        "outputTokens": {"mean": output_tokens, "kind": output_dist},
        "ignoreEos": ignore_eos,
        "topics": topics,
        "topicSkew": skew,
        "driftPeriodS": drift_period,
        "seed": seed,
    }
    try:
        traffic = TrafficConfig.model_validate(wire)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        field = str(first["loc"][0]) if first["loc"] else message.partition(": ")[0]
        if not first["loc"] and field in TRAFFIC_OPTIONS:  # a cross-field rule names its field
            message = message.partition(": ")[2]
        where = TRAFFIC_OPTIONS.get(field, "traffic")
        if where == "--concurrency" and not first["loc"]:
            where = "--concurrency (or --rate)"
        fail(f"{where}: {message}")
    last_line = [0.0]
    live = Live(console=console, refresh_per_second=4) if console.is_terminal else None

    def on_progress(records: list[Any], elapsed: float) -> None:
        summary = summarize(records, elapsed)
        if live is not None:
            live.update(progress_table(summary, f"bench-serve {url}"))
        elif elapsed - last_line[0] >= 5.0:
            last_line[0] = elapsed
            error_console.print(progress_line(summary), markup=False, highlight=False)

    try:
        if live is not None:
            live.start()
        result = asyncio.run(run_traffic(url, traffic, model, on_progress))
    except (OSError, ValueError) as exc:
        fail(f"{url}: {exc}")
    except httpx.HTTPError as exc:  # before the first request: no server there, no /v1/models
        fail(f"{url}: {type(exc).__name__}: {exc}")
    finally:
        if live is not None:
            live.stop()
    report = {
        "bench": "serve",
        "url": url,
        "traffic": traffic.model_dump(by_alias=True, mode="json"),
        **result.summary(),
    }
    text = json.dumps(report)
    sys.stdout.write(text + "\n")
    if out is not None:
        out.write_text(text + "\n")


@app.command()
def crd() -> None:
    """Print the MoEDeployment CustomResourceDefinition (what `helm install` applies)."""
    from moe_operator.crdgen import render

    sys.stdout.write(render())


def main() -> None:
    """The console script: the commands, and a missing optional dependency as one error line
    naming the extra that installs it (instead of a traceback)."""
    from moe_operator.extras import extra_for_module, install_hint

    try:
        app()
    except ModuleNotFoundError as exc:
        extra = extra_for_module(exc.name)
        if extra is None:
            raise
        say(f"error: {exc}: {install_hint(extra)}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
