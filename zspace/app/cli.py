"""The `zspace` command line. Commands are thin: parse, call one library function, print.

Heavy imports (torch, onnx) happen inside the commands that need them, so
`zspace --help` is instant and serving-only installs work without torch.
"""

from __future__ import annotations

import os
import signal
import sys

if len(sys.argv) > 1 and sys.argv[1] == "serve" and (__name__ == "__main__" or os.path.basename(sys.argv[0]) == "zspace"):
    # A process started to serve: SIGTERM ends it quietly (exit 0) from here on, before even click and numpy
    # load, until the server's own handlers are in place (an orchestrator may stop a container that is still
    # starting). The one place this handler is installed; a worker process has its own (service/workers.py).
    # os._exit, not sys.exit: nothing is served or written yet, and an exception raised wherever the signal
    # lands (inside an import, a finally block) could turn into another error on its way out.
    signal.signal(signal.SIGTERM, lambda *_: (sys.stdout.flush(), sys.stderr.flush(), os._exit(0)))

from pathlib import Path  # noqa: E402

import click  # noqa: E402

from zspace.bundle import PRECISIONS as PRECISION_CHOICES  # noqa: E402
from zspace.data import SPEC_HELP  # noqa: E402
from zspace.errors import UserError  # noqa: E402


class InputError(click.ClickException):
    """A UserError surfaced through click: one line on stderr, exit code 2."""

    exit_code = 2


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise InputError(str(exc)) from None
        except OSError as exc:  # a path the user gave that cannot be written or read
            raise InputError(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None


def parse_hidden(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer sizes such as 1000,500,250, got {value!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter(f"expected positive layer sizes such as 1000,500,250, got {value!r}")
    return sizes


# Every option can also come from the environment: ZSPACE_<COMMAND>_<OPTION>, e.g. ZSPACE_SERVE_MAX_BATCH=32.
@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                          "auto_envvar_prefix": "ZSPACE"})
@click.version_option(package_name="zspace")
def main() -> None:
    """zspace: learn compact latent codes, export them as ONNX bundles, serve and search them."""


def with_options(f, options: list):
    """`f` decorated with each click option, in the order listed (as stacked decorators would read)."""
    for option in reversed(options):
        f = option(f)
    return f


def sizes(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def train_options(f):
    """`zspace train`'s options; their defaults are TrainConfig's own (zspace.training.train), the one place
    each lives, as serve_options takes ServeConfig's. --binarize and the other flags default to off there too."""
    from zspace.training.config import TrainConfig

    d = TrainConfig
    options = [
        click.option("--data", default=d.data, help=f"Data set: {SPEC_HELP}."),
        click.option("--model", "kind", type=click.Choice(["pca", "ae", "vae", "beta-vae", "hash"]), default=d.model.replace("_", "-"),
                     help="Model family; hash: semantic hashing (binary codes, Salakhutdinov & Hinton 2009)."),
        click.option("--latent-dim", type=click.IntRange(min=1), default=None, help="Size K of the latent code (hash: --bits)."),
        click.option("--bits", type=click.IntRange(min=0), default=d.bits, help="hash: code bits, a multiple of 8 (32, 64, 128)."),
        click.option("--hash-noise", type=click.FloatRange(min=0), default=d.hash_noise,
                     help="hash: std of the Gaussian noise added before the code sigmoid while training (drives codes to 0/1)."),
        click.option("--arch", type=click.Choice(["auto", "mlp", "conv"]), default=d.arch,
                     help="Network: fully connected, or convolutional for images; auto: conv for images of 16x16 and up."),
        click.option("--hidden", default=sizes(d.hidden), callback=parse_hidden, help="Encoder hidden sizes; the decoder mirrors them."),
        click.option("--channels", default=sizes(d.channels), callback=parse_hidden,
                     help="conv: channels of the stride-2 layers (as many as halve the image to 4x4 or less)."),
        click.option("--activation", type=click.Choice(["relu", "silu", "gelu", "elu", "sigmoid", "tanh"]), default=d.activation, help="Hidden unit."),
        click.option("--likelihood", type=click.Choice(["auto", "bernoulli", "gaussian", "multinomial"]), default=d.likelihood,
                     help="Decoder distribution; auto: bernoulli for [0,1] images, multinomial (softmax over words) for texts, gaussian otherwise."),
        click.option("--epochs", type=click.IntRange(min=0), default=d.epochs,
                     help="Training epochs (total, also when resuming); 0: auto, 30 or more so that small data sets still get 3000 steps."),
        click.option("--batch-size", type=click.IntRange(min=0), default=d.batch_size,
                     help="Examples per step; 0: auto, a 32nd of the training rows, 16 to 128 (128 from 4096 rows on)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=d.lr, help="Peak learning rate (warm-up then cosine)."),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=d.weight_decay, help="AdamW weight decay."),
        click.option("--seed", type=int, default=d.seed, help="Seed for initialisation, shuffling and sampling."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=d.device, help="auto: CUDA when torch sees a GPU."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=d.val_fraction, help="Share of training rows held out (fixed seed) for validation."),
        click.option("--binarize", is_flag=True, default=d.binarize, help="Train on Bernoulli samples of [0,1] data (binarised-MNIST protocol)."),
        click.option("--augment-shift", type=click.IntRange(min=0), default=d.augment_shift, help="Images: shift each training image by up to N pixels."),
        click.option("--beta", type=click.FloatRange(min=0), default=d.beta, help="beta-vae: weight of the KL term (Higgins et al.)."),
        click.option("--capacity-max", type=click.FloatRange(min=0), default=d.capacity_max, help="beta-vae: capacity C_max in nats; switches to Burgess et al.'s form."),
        click.option("--capacity-gamma", type=click.FloatRange(min=0), default=d.capacity_gamma, help="beta-vae capacity form: gamma."),
        click.option("--capacity-ramp-steps", type=click.IntRange(min=1), default=d.capacity_ramp_steps, help="beta-vae capacity form: steps to reach C_max."),
        click.option("--kl-warmup-steps", type=click.IntRange(min=0), default=d.kl_warmup_steps,
                     help="VAE kinds: the KL weight rises linearly from 0 to its value over these steps (0: off)."),
        click.option("--iw-samples", type=click.IntRange(min=1), default=d.iw_samples,
                     help="VAE: importance samples of the training bound; above 1 trains the IWAE bound (Burda et al.)."),
        click.option("--vocab-size", type=click.IntRange(min=2), default=d.vocab_size, help="Texts: words in the vocabulary."),
        click.option("--weighting", type=click.Choice(["counts", "binary", "log1p", "tfidf"]), default=d.weighting, help="Texts: word weighting."),
        click.option("--threads", type=click.IntRange(min=0), default=d.threads, help="CPU threads for torch (0: torch's default)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint, with the run's "
                     "own settings (only --epochs, --device and --threads may change; --latent-dim is not needed)."),
        click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Minutes: stop after the epoch that passes it (checkpoint kept); --resume continues the schedule."),
        click.option("--nproc", type=click.IntRange(min=1), default=1,
                     help="Data-parallel processes on this machine (torch.distributed DDP: gloo on CPU, nccl on CUDA, "
                       "one GPU each); same global batch. Or run under torchrun."),
        click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder to write."),
    ]
    return with_options(f, options)


@main.command()
@train_options
def train(kind, out, resume, time_limit, nproc, **opts) -> None:
    """Train a model and write checkpoints, metrics and plots into a run folder."""
    import os

    from click.core import ParameterSource

    from zspace.training.plots import run_plots
    from zspace.training.train import TrainConfig, resumed_config
    from zspace.training.train import train as run_training

    if opts["latent_dim"] is None and kind != "hash" and not resume:
        raise InputError(f"--latent-dim: required for --model {kind} (the size K of the code)")
    if opts["latent_dim"] is not None and kind == "hash":
        raise InputError("--latent-dim: a hash model's code size is --bits")
    opts["latent_dim"] = opts["latent_dim"] or 0
    cfg = TrainConfig(model=kind.replace("-", "_"), **opts)
    if resume:  # the run's own settings; an option given here that disagrees with them is refused by name
        ctx = click.get_current_context()
        given = {"model" if name == "kind" else name for name in ("kind", *opts)
                 if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
        cfg = resumed_config(cfg, Path(out), given)
    limit_s = time_limit * 60 if time_limit else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: this process is one rank
        from zspace.training.distributed import train_under_torchrun

        train_under_torchrun(cfg, Path(out), resume=resume, time_limit_s=limit_s)
        if int(os.environ["RANK"]):
            return  # rank 0 draws the plots
        run = Path(out)
    elif nproc > 1:
        from zspace.training.distributed import train_parallel

        run = train_parallel(cfg, Path(out), nproc, resume=resume, time_limit_s=limit_s)
    else:
        run = run_training(cfg, Path(out), resume=resume, time_limit_s=limit_s)
    pngs = run_plots(run)
    click.echo(f"run: {run}  (best.pt, metrics.jsonl, {', '.join(p.name for p in pngs)})")


@main.command()
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option("--data", default=None, help=f"Data set ({SPEC_HELP}); default: the one the model was trained on.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
@click.option("--k", "k", type=click.IntRange(min=0), default=100,
              help="VAE kinds: importance samples per test example for IS-NLL (0: skip; 1000 or more for the papers' "
                   "protocol, ten times the time).")
@click.option("--nll-examples", type=click.IntRange(min=1), default=None, help="VAE kinds: IS-NLL on the first N test rows only (default: all).")
@click.option("--queries", type=click.IntRange(min=1), default=1000,
              help="mAP on this many test queries drawn with a fixed seed (precision@10 and k-NN always take all).")
@click.option("--full", is_flag=True, help="mAP on every test query (ranks the whole training set for each: slow).")
@click.option("--baselines", default="pca,raw", help="Baselines beside the model: a comma list of pca, raw; or none.")
def evaluate(target, data, json_path, k, nll_examples, queries, full, baselines) -> None:
    """Evaluate a run folder or a bundle on a data set's test split, beside PCA and the raw input."""
    from zspace.training.evaluate import evaluate as run_eval
    from zspace.training.evaluate import format_table, write_json

    chosen = tuple(b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none")
    report = run_eval(Path(target), data, k=k, nll_examples=nll_examples, baselines=chosen,
                      map_queries=None if full else queries)
    click.echo(format_table(report))
    if (Path(target) / "run.json").is_file():
        write_json(report, Path(target) / "evaluation.json")
    if json_path:
        write_json(report, Path(json_path))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", type=click.Path(file_okay=False), default="models", help="Model repository folder.")
@click.option("--name", required=True, help="Model name in the repository.")
@click.option("--version", "version", type=click.IntRange(min=1), default=None, help="Bundle version (default: highest + 1).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="fp32", show_default=True,
              help="The graphs' precision: int8 (dynamic quantization; fastest on CPUs) or fp16 (for GPUs) are made from "
                   "the fp32 graphs and carry their measured cost and tolerance in the manifest.")
def export(run, repo, name, version, precision) -> None:
    """Export a run as models/<name>/<version>/ (ONNX encoder and decoder + manifest); prints its path."""
    from zspace.training.export import export_run

    path = export_run(Path(run), Path(repo), name, version, precision)
    click.echo(path)
    if precision != "fp32":
        click.echo(describe_cost(path), err=True)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", type=click.Choice(["int8", "fp16"]), required=True, help="The variant to make.")
@click.option("--version", "version", type=click.IntRange(min=1), default=None,
              help="The variant's version (default: the model's highest + 1).")
@click.option("--data", default=None, help="Data set whose test split measures the cost (default: the manifest's).")
def quantize(bundle, precision, version, data) -> None:
    """Make an int8 or fp16 variant of an fp32 bundle (models/NAME/VERSION, or models/NAME: its highest) as the
    model's next version; prints its path and what the precision costs on the test split."""
    from zspace.training.quantize import quantize_bundle

    made = quantize_bundle(Path(bundle), precision, version, data)
    click.echo(made)
    click.echo(describe_cost(made), err=True)


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=".", help="Where runs/ and models/ are written.")
@click.option("--epochs", type=click.IntRange(min=1), default=300, help="Training epochs for the digits VAE.")
def quickstart(workdir, epochs) -> None:
    """Train a VAE on the built-in digits, evaluate, export, serve it, call it, stop it; print where everything is."""
    from zspace.app.quickstart import quickstart as run_quickstart

    # 0.1 s an epoch on an idle 2-core machine, 2 s on a loaded one (README): the range, then the measured pace.
    fast, slow = max(1, round(epochs * 0.1 / 60)), max(2, round(epochs * 2 / 60))
    click.echo(f"quickstart: a VAE on scikit-learn's 8x8 digits for {epochs} epochs ({fast} to {slow} min on 2 "
               "cores, idle to loaded; an estimate follows the first epoch; --epochs N to change), then evaluate, "
               "export, index, serve and call it", err=True)
    summary = run_quickstart(Path(workdir), epochs=epochs)
    click.echo(format_summary(summary))


def describe_cost(path: Path) -> str:
    """One line of a variant's measured cost against fp32, from its manifest."""
    from zspace.bundle import load_bundle

    block = load_bundle(path).manifest["precision"]
    cost = block["cost"]
    p10 = "" if cost["p_at_10"] is None else f", P@10 {cost['p_at_10']:.4f} (fp32 {cost['p_at_10_fp32']:.4f})"
    bits = f", bits agree {cost['bits_agreement']:.4f}" if "bits_agreement" in cost else ""
    return (f"{block['name']}: codes within {cost['code_max_abs']:.2g} of fp32 ({100 * cost['code_max_of_range']:.2f}% of "
            f"their range), squared error {cost['sq_error']:.4g} vs {cost['sq_error_fp32']:.4g} "
            f"({100 * cost['sq_error_change']:+.2f}%){p10}{bits} on {cost['rows']} test rows")


def format_summary(summary: dict) -> str:
    """Where everything is, as a short table (the full summary is in quickstart.json beside the run)."""
    served = summary["served"]
    rows = [("run folder", summary["run"]), ("model bundle", summary["bundle"]), ("index", summary["index"]),
            ("evaluation", summary["evaluation"]), ("pictures", ", ".join(Path(p).name for p in summary["pictures"])),
            ("test squared error", f"{summary['test_sq_error']:.3f} (PCA at the same size: {summary['pca_sq_error']:.3f})"),
            ("served", f"{served['target']} on {served['provider']}: Encode, Reconstruct, Generate, Search answered, then stopped"),
            ("full summary", summary["summary_json"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def serve_options(f):
    """`zspace serve`'s options; their defaults are the config classes' own (zspace.service.config)."""
    from zspace.service.config import SERVE_RUNTIME, BatchConfig, Limits, SearchConfig, ServeConfig

    d, b, lim, srch, rt = ServeConfig, BatchConfig, Limits, SearchConfig, SERVE_RUNTIME
    options = [
        click.option("--models", type=click.Path(file_okay=False), required=True, help="Model repository: NAME/VERSION/ bundles."),
        click.option("--indexes", type=click.Path(file_okay=False), default=None, help="Folder of indexes (one per subfolder) to serve beside the models."),
        click.option("--host", default=d.host, help="Address to bind; 0.0.0.0 in containers."),
        click.option("--port", type=click.IntRange(0, 65535), default=d.port, help="gRPC port (0: any free port)."),
        click.option("--metrics-port", default=str(d.metrics_port),
                     help="Prometheus /metrics: PORT (on --host) or HOST:PORT, e.g. 127.0.0.1:9100 to keep it on "
                          "loopback while gRPC listens on 0.0.0.0; 0: off. /metrics needs no token."),
        click.option("--http-port", default=None, envvar=["ZSPACE_HTTP_PORT", "ZSPACE_SERVE_HTTP_PORT"],
                     help="Also serve HTTP: KServe v2 REST, JSON endpoints (/openapi.json) and the web explorer "
                          "(/ui/); PORT (on --host) or HOST:PORT, 0: any free port. Same token, TLS and limits as "
                          "gRPC. Default: off (8000 in the container). Env: ZSPACE_HTTP_PORT."),
        click.option("--media-root", "media_roots", multiple=True, type=click.Path(exists=True, file_okay=False),
                     help="A folder whose images items' payloads may name (field image, path, file or source, "
                          "relative to it): the explorer shows them instead of decoded codes. Repeatable."),
        click.option("--workers", default="1", envvar=["ZSPACE_WORKERS", "ZSPACE_SERVE_WORKERS"],
                     help="Server processes sharing the port (SO_REUSEPORT), supervised and restarted; auto: one per "
                          "core, at most 16. Env: ZSPACE_WORKERS."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=rt.device, help="auto: CUDA only when onnxruntime-gpu can use a GPU here."),
        click.option("--cuda-tf32", is_flag=True, default=rt.cuda_tf32,
                     help="CUDA: TF32 matmuls, faster but inexact (codes move ~1e-3); reported in ListModels. Off: exact."),
        click.option("--threads", type=click.IntRange(min=0), default=rt.threads,
                     help="ONNX Runtime threads per run (0: the cores shared out among --instances)."),
        click.option("--faiss-threads", type=click.IntRange(min=0), default=d.faiss_threads,
                     help="FAISS OpenMP threads for index searches, process-wide (0: FAISS's default, the core count)."),
        click.option("--instances", type=click.IntRange(min=1), default=b.instances,
                     help="ONNX Runtime runs in flight per model graph; for many concurrent big requests try the core count with --threads 1."),
        click.option("--max-batch", type=click.IntRange(min=1), default=b.max_batch, help="Rows merged into one ONNX Runtime call (1: batching off)."),
        click.option("--max-delay-ms", type=click.FloatRange(0, 10_000), default=b.max_delay_ms,
                     help="Longest wait for a batch to fill, taken only while waiting merges requests; 0: never wait."),
        click.option("--max-queue", type=click.IntRange(min=1), default=b.max_queue_rows, help="Rows waiting per graph before RESOURCE_EXHAUSTED, in each of two lanes: requests up to --max-batch rows, and bigger ones."),
        click.option("--search-max-batch", type=click.IntRange(min=1), default=srch.max_batch,
                     help="Concurrent Search queries of one index merged into one FAISS call."),
        click.option("--max-rows", type=click.IntRange(min=1), default=lim.max_rows, help="Largest batch one request may send."),
        click.option("--max-decode-mpx", type=click.IntRange(min=1), default=lim.max_decode_pixels // 1_000_000,
                     help="Image megapixels decoded at once, server-wide (peak memory is about 5.5 bytes a pixel); "
                          "more decode big images side by side, faster and with more memory."),
        click.option("--max-message-mb", type=click.IntRange(min=1), default=d.max_message_mb, help="gRPC message size limit (both ways)."),
        click.option("--max-concurrent-rpcs", type=click.IntRange(min=1), default=d.max_concurrent_rpcs,
                     help="RPCs in progress at once; beyond it gRPC answers RESOURCE_EXHAUSTED."),
        click.option("--max-inflight-mb", type=click.IntRange(min=1), default=d.max_inflight_mb,
                     help="Bytes of requests being worked on; a big request (over 1 MiB) beyond it is refused at once."),
        click.option("--poll-s", type=click.FloatRange(min=0), default=d.poll_s, help="Rescan --models this often (0: on SIGHUP only)."),
        click.option("--grace-s", type=click.FloatRange(min=0), default=d.grace_s, help="SIGTERM: time for in-flight requests to finish."),
        click.option("--loop", type=click.Choice(["auto", "uvloop", "asyncio"]), default=d.loop,
                     help="Event loop: auto takes uvloop when it is installed (more requests per core), else asyncio's own."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM certificate (with --tls-key)."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM private key."),
        click.option("--precision", type=click.Choice(PRECISION_CHOICES), default=None,
                     help="Answer requests for a model's latest version with its highest version of this precision "
                          "(int8, fp16 or fp32 bundles from `zspace quantize`), where it has one; serving.json's "
                          "\"precision\" overrides it per model. Default: the highest version."),
        click.option("--uds", type=click.Path(dir_okay=False), default=None,
                     help="Also listen on this Unix domain socket (unix:PATH for clients); local clients there use "
                          "shared memory for big tensors. With --workers 1."),
        click.option("--shared-memory", type=click.Choice(["local", "any", "off"]), default=d.shared_memory,
                     help="Who may register shared memory regions (big tensors without copies): local, clients on "
                          "loopback or a Unix socket; any (clients in other containers sharing this IPC namespace); off."),
        click.option("--token-file", type=click.Path(dir_okay=False), default=None, help="Require this bearer token (first line of the file)."),
        click.option("--token-env", default="ZSPACE_TOKEN", help="Or require the token in this environment variable, when set."),
    ]
    return with_options(f, options)


@main.command()
@serve_options
def serve(models, indexes, workers, device, cuda_tf32, threads, instances, max_batch, max_delay_ms, max_queue,
          search_max_batch, max_rows, max_decode_mpx, token_file, token_env, metrics_port, uds, http_port, media_roots,
          **opts) -> None:
    """Serve every bundle under --models over gRPC (health, reflection, metrics, hot reload), and HTTP with --http-port."""
    from zspace.runtime import RuntimeOptions
    from zspace.service.auth import read_token
    from zspace.service.config import SERVE_RUNTIME, BatchConfig, Limits, SearchConfig, ServeConfig, parse_host_port
    from zspace.service.server import serve as run_server
    from zspace.service.workers import supervise, worker_count

    runtime = RuntimeOptions.from_env(device=device, cuda_tf32=cuda_tf32, threads=threads, spin=SERVE_RUNTIME.spin)
    cfg = ServeConfig(models=Path(models), indexes=Path(indexes) if indexes else None, runtime=runtime,
                      batch=BatchConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue_rows=max_queue,
                                        instances=instances),
                      search=SearchConfig(max_batch=search_max_batch),
                      limits=Limits(max_rows=max_rows, max_decode_pixels=max_decode_mpx * 1_000_000),
                      token=read_token(token_file, token_env), uds=Path(uds) if uds else None,
                      media_roots=tuple(Path(r) for r in media_roots), **opts)
    cfg.metrics_host, cfg.metrics_port = parse_host_port(metrics_port, "--metrics-port")
    if http_port is not None and http_port != "":
        cfg.http_host, cfg.http_port = parse_host_port(http_port, "--http-port")
    workers = worker_count(workers)
    if workers > 1 and cfg.uds:
        raise UserError("--uds: one process listens on a Unix socket; use it with --workers 1 (workers share a TCP "
                        "port, which the kernel spreads over them)")
    if workers > 1:
        sys.exit(supervise(cfg, workers))
    sys.exit(run_server(cfg))  # on success the process ends in there (service.server.serve)


from zspace.app.client_cli import client  # noqa: E402  (the `zspace client ...` group)
from zspace.app.index_cli import index_group  # noqa: E402  (the `zspace index ...` group)

main.add_command(client)
main.add_command(index_group)

if __name__ == "__main__":
    sys.exit(main())
