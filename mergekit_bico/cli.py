"""Command line: ``mergekit-bico-yaml CONFIG OUT`` (mergekit's habit) and ``mergekit-bico {run,validate,
calibrate,methods}``.

Every error is printed as one line (``error: ...``) with exit code 2 for usage/config errors and 1 for
runtime errors; no traceback unless ``MERGEKIT_BICO_DEBUG=1``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from mergekit_bico import __version__
from mergekit_bico.errors import ConfigError, MergeKitBicoError

# torch's CPU allocator backs allocations >= 2 MiB with transparent huge pages when this is set
# (read once, at torch's first allocation, hence here, before anything imports torch). Every
# merge step allocates tensors of tens to hundreds of MB; with 4 KiB pages the page faults of
# these fresh allocations cost more than the arithmetic (e.g. `a - b` on 24.6M floats: 86 ms
# with 4 KiB pages, 23 ms with THP, 16 ms into an existing buffer). Only affects processes whose
# entry point is this module (the CLIs), not library users who imported torch already.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

log = logging.getLogger("mergekit_bico")


def _tune_malloc() -> None:
    """Keep freed tensor memory for reuse instead of returning it to the kernel (glibc only).

    glibc serves allocations above a dynamic threshold with mmap and gives the heap's free top
    back (trim) as soon as it exceeds twice that threshold: every merge step's fresh 16 MiB
    buffers were then page-faulted and zeroed by the kernel again (a third of the CPU time in
    ``perf``: clear_page_erms). Serving up to 32 MiB (glibc's maximum) from the heap and
    trimming only above 1 GiB free makes the next slice reuse the previous slice's pages; the
    retained memory is bounded by the (size-independent) working set.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _runs_torch(config_file: str, device: str, cuda: bool) -> bool:
    """Whether this merge will run torch (task_arithmetic of up to four models in float32 / float64 on the
    CPU run in numpy and never import it), from the YAML's ``merge_method`` and ``dtype`` alone;
    a config that does not parse counts as not (loading it reports the error).

    A merge that runs torch imports it before the rest of the package: imported after the
    executor's modules instead, the 1x TIES benchmark's peak RSS rose from 0.46-0.48 GB to
    0.54-1.1 GB (3+ runs each; the cause lies in glibc's heap layout, not in what is allocated)."""
    from mergekit_bico.dtypes import NUMPY_METHODS  # (torch-free, and imports nothing of ours)

    if cuda or device != "cpu":
        return True
    try:
        import yaml

        with open(config_file, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except Exception:  # noqa: BLE001 - load_config reports it properly
        return False
    if not isinstance(doc, dict):
        return False
    # 16-bit arithmetic runs in torch too (bfloat16 inputs without a dtype are found later)
    return doc.get("merge_method") not in NUMPY_METHODS or doc.get("dtype") in ("bfloat16", "float16")


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every failure into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = os.environ.get("MERGEKIT_BICO_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except MergeKitBicoError as err:
            if debug:
                raise
            _fail(str(err).splitlines()[0] if str(err) else type(err).__name__, err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; no output was written (partial files removed)", 130)
        except MemoryError:
            _fail("out of memory; lower --out-shard-size or use a memory_budget for transfers", 1)
        except OSError as err:
            if debug:
                raise
            where = f" '{err.filename}'" if getattr(err, "filename", None) else ""
            _fail(f"{err.strerror or err}{where}", 1)
        except click.exceptions.ClickException:
            raise
        except Exception as err:  # noqa: BLE001 - the CLI promises one line, never a traceback
            if debug:
                raise
            text = str(err).splitlines()[0] if str(err) else ""
            _fail(f"internal error: {type(err).__name__}: {text} (set MERGEKIT_BICO_DEBUG=1 for a traceback)", 1)

    return wrapper


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    log.setLevel(level)


def merge_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``mergekit-bico-yaml`` and ``mergekit-bico run`` (mergekit's names)."""
    opts = [
        click.option("--out-shard-size", default="5G", show_default=True, help="Max bytes per output shard (K/M/G suffixes)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Device for the merge maths and calibration."),
        click.option("--cuda", is_flag=True, help="Same as --device cuda (mergekit's flag)."),
        click.option("--dry-run", is_flag=True, help="Validate and print the plan (one line per output tensor); write nothing."),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty (atomically, at the end)."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True, help="Copy the tokenizer files into OUT."),
        click.option("--write-model-card/--no-write-model-card", default=True, show_default=True, help="Write README.md with the config."),
        click.option("--random-seed", type=int, default=0, show_default=True, help="Seed for DARE masks (mixed with each tensor's name)."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Calibration statistics cache (default: .mergekit_bico_cache beside OUT)."),
        click.option("--trust-remote-code", is_flag=True, help="Accepted for mergekit compatibility; it allows nothing: code from a model folder runs only where the config's calibration block says trust_remote_code: true."),
        click.option("--nan-policy", type=click.Choice(["error", "warn", "ignore"]), default="error", show_default=True, help="What to do with NaN/Inf in an input tensor."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars or info messages."),
        click.option("--verbose", "-v", is_flag=True, help="Debug logging."),
        click.option("--lazy-unpickle", is_flag=True, hidden=True, help="Accepted for mergekit compatibility; loading is always lazy."),
        click.option("--low-cpu-memory", is_flag=True, hidden=True, help="Accepted for mergekit compatibility; memory is always bounded."),
        click.option("--allow-crimes", is_flag=True, hidden=True, help="Accepted for mergekit compatibility."),
        click.option("--safe-serialization/--no-safe-serialization", default=True, hidden=True, help="Output is always safetensors."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _do_merge(config_file: str, out_path: str, *, out_shard_size: str, device: str, cuda: bool, dry_run: bool,
              overwrite: bool, copy_tokenizer: bool, write_model_card: bool, random_seed: int,
              cache_dir: Optional[Path], trust_remote_code: bool, nan_policy: str, quiet: bool, verbose: bool,
              **_ignored: Any) -> None:
    if not dry_run and _runs_torch(config_file, device, cuda):
        import torch  # noqa: F401  (first: see _runs_torch)
    from mergekit_bico.config import load_config
    from mergekit_bico.executor import RunOptions
    from mergekit_bico.io.writer import check_output_dir, cleanup_stale_partials, parse_size
    from mergekit_bico.pipeline import run_merge
    from mergekit_bico.plan import build_plan, plan_summary

    _setup_logging(verbose, quiet)
    if cuda:
        device = "cuda"
    _check_device(device)
    shard_bytes = parse_size(out_shard_size)
    if shard_bytes <= 0:
        raise ConfigError(f"--out-shard-size must be positive, got {out_shard_size!r}")
    config_path = Path(config_file)
    config = load_config(config_path)
    _tune_malloc()
    out = Path(out_path)
    if dry_run:
        plan = build_plan(config, config_dir=config_path.parent, random_seed=random_seed)
        click.echo(plan_summary(plan))
        return
    from mergekit_bico.plan import resolve_model_path

    protected = [Path(resolve_model_path(m, config_path.parent)) for m in config.referenced_models()]
    cleanup_stale_partials(out)
    check_output_dir(out, overwrite=overwrite, protected=protected)
    options = RunOptions(
        out_shard_size=shard_bytes, device=device, overwrite=overwrite, copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card, progress=not quiet, cache_dir=cache_dir,
        trust_remote_code=trust_remote_code, nan_policy=nan_policy,
    )
    result = run_merge(config, config_path, out, options, random_seed=random_seed)
    if not quiet:
        click.echo(
            f"wrote {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) to {result.out_path} "
            f"in {result.seconds:.1f} s"
        )
        for rep in result.reports:
            click.echo(f"transfer report: {rep}")


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was given but no CUDA device is available")


@click.command("mergekit-bico-yaml", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", metavar="CONFIG")
@click.argument("out_path", metavar="OUT")
@merge_options
@click.version_option(__version__, prog_name="mergekit-bico")
@one_line_errors
def yaml_main(config_file: str, out_path: str, **kwargs: Any) -> None:
    """Merge the models described by the YAML file CONFIG into the folder OUT."""
    _do_merge(config_file, out_path, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-bico")
def main() -> None:
    """mergekit-bico: streaming model merging and BiCo task-vector transfer."""


@main.command("run")
@click.argument("config_file", metavar="CONFIG")
@click.argument("out_path", metavar="OUT")
@merge_options
@one_line_errors
def run_cmd(config_file: str, out_path: str, **kwargs: Any) -> None:
    """Merge the models described by CONFIG into OUT (same as mergekit-bico-yaml)."""
    _do_merge(config_file, out_path, **kwargs)


@main.command("validate")
@click.argument("config_file", metavar="CONFIG")
@click.option("--show-plan", is_flag=True, help="Also print one line per output tensor.")
@one_line_errors
def validate_cmd(config_file: str, show_plan: bool) -> None:
    """Check CONFIG against the models on disk (keys, parameters, tensors, shapes) without merging."""
    from mergekit_bico.config import load_config
    from mergekit_bico.plan import build_plan, plan_summary

    path = Path(config_file)
    plan = build_plan(load_config(path), config_dir=path.parent)
    if show_plan:
        click.echo(plan_summary(plan))
    click.echo(f"ok: {path} is valid ({plan.method.name}, {len(plan.entries)} inputs, {len(plan.jobs)} output tensors)")


@main.command("methods")
def methods_cmd() -> None:
    """List the merge methods and their parameters."""
    from mergekit_bico.methods import list_methods

    for method in list_methods():
        click.echo(f"{method.name}: {method.summary}")
        click.echo(f"  base model: {method.base}")
        for p in method.params:
            req = "required" if p.required else f"default {p.default!r}"
            click.echo(f"  {p.scope:6s} {p.name} ({p.type.__name__}, {req}){': ' + p.doc if p.doc else ''}")


@main.command("calibrate")
@click.argument("config_file", metavar="CONFIG")
@click.argument("out_path", metavar="[OUT]", required=False)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Statistics cache folder (default: the merge's, .mergekit_bico_cache beside OUT; without OUT, beside CONFIG).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--quiet", "-q", is_flag=True)
@one_line_errors
def calibrate_cmd(config_file: str, out_path: Optional[str], cache_dir: Optional[Path], device: str, quiet: bool) -> None:
    """Precompute the calibration statistics CONFIG needs (Fisher, BiCo maps) into the cache that
    `mergekit-bico-yaml CONFIG OUT` will read (give the same OUT, or the same --cache-dir)."""
    from mergekit_bico.config import load_config
    from mergekit_bico.pipeline import CACHE_NAME, calibrate_only, default_cache_dir

    _setup_logging(False, quiet)
    _check_device(device)
    path = Path(config_file)
    config = load_config(path)
    cache = cache_dir or (default_cache_dir(Path(out_path)) if out_path else path.parent / CACHE_NAME)
    for line in calibrate_only(config, path, cache, device=device, progress=not quiet):
        click.echo(line)
    click.echo(f"statistics cache: {cache}")


if __name__ == "__main__":  # pragma: no cover
    main()
