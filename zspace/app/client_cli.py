"""`zspace client --target HOST:PORT COMMAND`: the service for people, files in and out.

Image models take and give PNG files; every command that returns tensors also
writes them as .npy. A failed call prints the gRPC status name and message
and exits 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np

from zspace.app.index_cli import WHERE_HELP
from zspace.transforms import is_png_or_jpeg


class RpcGroup(click.Group):
    def invoke(self, ctx):
        import grpc

        try:
            return super().invoke(ctx)
        except grpc.RpcError as exc:
            click.echo(f"{exc.code().name}: {exc.details()}", err=True)
            ctx.exit(1)


@click.group(cls=RpcGroup, context_settings={"show_default": True})
@click.option("--target", default="127.0.0.1:50051",
              help="Server address HOST:PORT; replicas as H1:P1,H2:P2 or dns:///NAME:PORT (calls balanced round robin).")
@click.option("--token-env", default="ZSPACE_TOKEN", help="Send the bearer token from this environment variable, when set.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM CA certificate: use TLS.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, help="Deadline per call, seconds.")
@click.pass_context
def client(ctx, target, token_env, tls_ca, timeout) -> None:
    """Call a running zspace server."""
    from zspace.service.client import ZSpaceClient

    ctx.obj = ZSpaceClient(target, token=os.environ.get(token_env) or None, tls_ca=tls_ca, timeout=timeout)
    ctx.call_on_close(ctx.obj.close)


def model_options(f):
    f = click.option("--version", type=click.IntRange(min=0), default=0, help="Model version (0: highest).")(f)
    return click.option("--model", required=True, help="Model name (see `models`).")(f)


def input_options(f):
    f = click.option("--npy", type=click.Path(exists=True, dir_okay=False), default=None, help="float32 array [batch, input_dim].")(f)
    f = click.option("--text", "texts", multiple=True, help="A document (repeat for a batch).")(f)
    return click.option("--png", "pngs", multiple=True, type=click.Path(exists=True, dir_okay=False),
                        help="An image file, PNG or JPEG (repeat for a batch).")(f)


def out_option(f):
    return click.option("--out", type=click.Path(file_okay=False), default=".", help="Folder for .npy and PNG outputs.")(f)


def gather_inputs(pngs, texts, npy) -> dict:
    given = [bool(pngs), bool(texts), npy is not None]
    if sum(given) != 1:
        raise click.UsageError("give inputs as exactly one of --png (repeatable), --text (repeatable) or --npy")
    if pngs:
        images = [Path(p).read_bytes() for p in pngs]
        for path, data in zip(pngs, images):
            if not is_png_or_jpeg(data):
                raise click.BadParameter(f"{path} is not a PNG or JPEG image", param_hint="--png")
        return {"images": images}
    if texts:
        return {"texts": list(texts)}
    try:
        x = np.load(npy)
        return {"x": x if x.dtype == np.uint8 else x.astype(np.float32)}  # 8-bit images travel as uint8
    except (ValueError, OSError) as exc:
        raise click.UsageError(f"--npy: cannot read {npy} as a numpy array ({exc})") from None


def write_outputs(out: str, stem: str, decoded) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{stem}.npy", decoded.x)
    for i, png in enumerate(decoded.png):
        (folder / f"{stem}_{i:03d}.png").write_bytes(png)
    click.echo(f"wrote {folder / (stem + '.npy')} {list(decoded.x.shape)}"
               + (f" and {len(decoded.png)} PNGs in {folder}" if decoded.png else ""))


def wants_png(c, model: str, version: int) -> bool:
    return c.get_model(model, version).modality == "image"


@client.command()
@click.pass_obj
def health(c) -> None:
    """Print the server's health status (SERVING, NOT_SERVING)."""
    click.echo(c.health())


@client.command()
@click.pass_obj
def models(c) -> None:
    """List loaded models (and broken bundles) as JSON."""
    resp = c.list_models()
    rows = [{"name": m.name, "version": m.version, "versions": list(m.versions), "kind": m.kind,
             "modality": m.modality, "input_shape": list(m.input_shape) or [m.input_dim], "latent_dim": m.latent_dim,
             "provider": m.execution_provider, "precision": m.precision, "precision_from": m.precision_from or None,
             "answers_latest": m.answers_latest} for m in resp.models]
    click.echo(json.dumps({"models": rows, "broken": [{"path": b.path, "error": b.error} for b in resp.broken]}, indent=1))


@client.command()
@model_options
@input_options
@out_option
@click.pass_obj
def encode(c, model, version, pngs, texts, npy, out) -> None:
    """Inputs -> latent codes (codes.npy; logvar.npy for VAE kinds; bits.npy, packed uint8, for hash models)."""
    codes = c.encode_all(model, version=version, **gather_inputs(pngs, texts, npy))
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, array in codes.items():
        np.save(Path(out) / ("codes.npy" if name == "mean" else f"{name}.npy"), array)
    extra = "".join(f", {name}.npy" for name in codes if name != "mean")
    click.echo(f"wrote {(Path(out) / 'codes.npy').resolve()} {list(codes['mean'].shape)}{extra}")


@client.command()
@model_options
@click.option("--npy", type=click.Path(exists=True, dir_okay=False), required=True, help="Latents [batch, latent_dim].")
@out_option
@click.pass_obj
def decode(c, model, version, npy, out) -> None:
    """Latent codes -> outputs (decoded.npy, PNGs for image models)."""
    z = np.load(npy).astype(np.float32)
    write_outputs(out, "decoded", c.decode(model, z, version=version, return_png=wants_png(c, model, version)))


@client.command()
@model_options
@click.option("--count", type=int, default=16, help="How many samples.")
@click.option("--seed", type=int, default=0, help="Sampling seed.")
@click.option("--temperature", type=float, default=1.0, help="Scale of the prior's spread.")
@out_option
@click.pass_obj
def generate(c, model, version, count, seed, temperature, out) -> None:
    """Samples from the model's prior, decoded (samples.npy, PNGs for image models)."""
    write_outputs(out, "samples", c.generate(model, count, seed, temperature, version=version,
                                             return_png=wants_png(c, model, version)))


@client.command()
@model_options
@input_options
@click.option("--steps", type=int, default=8, help="Points on the path, ends included.")
@click.option("--spherical", is_flag=True, help="Spherical instead of linear interpolation.")
@out_option
@click.pass_obj
def interpolate(c, model, version, pngs, texts, npy, steps, spherical, out) -> None:
    """Two inputs -> the decoded path between their codes (path.npy, PNGs)."""
    write_outputs(out, "path", c.interpolate(model, version=version, steps=steps, spherical=spherical,
                                             return_png=wants_png(c, model, version), **gather_inputs(pngs, texts, npy)))


@client.command()
@model_options
@input_options
@click.pass_obj
def score(c, model, version, pngs, texts, npy) -> None:
    """Anomaly scores (reconstruction error; negative ELBO for VAE kinds), one per input."""
    scores, kind = c.score(model, version=version, **gather_inputs(pngs, texts, npy))
    click.echo(json.dumps({"score_kind": kind, "scores": [round(float(s), 6) for s in scores]}))


@client.command()
@click.option("--index", "index_name", required=True, help="Index name (see the server's ListIndexes).")
@click.option("--key", default=None, help="Query with the code of this stored item.")
@input_options
@click.option("-k", "k", type=int, default=10, help="Neighbours per query.")
@click.option("--where", multiple=True, help=WHERE_HELP)
@click.option("--vectors", is_flag=True, help="--npy holds latent codes, not inputs.")
@click.option("--explain", is_flag=True, help="Also print the server's plan of the filter.")
@click.pass_obj
def search(c, index_name, key, pngs, texts, npy, k, where, vectors, explain) -> None:
    """Nearest stored items to a key, inputs or codes; JSON out."""
    from zspace.app.index_cli import hits_json, parse_where

    where = parse_where(where) or None
    if key is not None:
        query = {"key": key}
    elif vectors:
        if npy is None:
            raise click.UsageError("--vectors needs --npy")
        query = {"vectors": np.load(npy).astype(np.float32)}
    else:
        query = gather_inputs(pngs, texts, npy)
    hits, plan = c.search_explained(index_name, k=k, where=where, explain=explain, **query)
    if explain:
        click.echo(json.dumps({"plan": plan, "hits": json.loads(hits_json(hits))}, indent=1))
    else:
        click.echo(hits_json(hits))


@client.command()
@click.option("--index", "index_name", required=True, help="Index name.")
@click.option("--key", "keys", multiple=True, required=True, help="Item key, one per input (repeatable).")
@click.option("--payload", "payloads", multiple=True, help="JSON object per key (repeatable; none: {}).")
@input_options
@click.pass_obj
def upsert(c, index_name, keys, payloads, pngs, texts, npy) -> None:
    """Insert or replace items (encoded by the index's model)."""
    try:
        parsed = [json.loads(p) for p in payloads]
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg})", param_hint="--payload") from None
    count = c.upsert(index_name, list(keys), payloads=parsed or None, **gather_inputs(pngs, texts, npy))
    click.echo(json.dumps({"index": index_name, "upserted": len(keys), "count": count}))


@client.command()
@click.option("--index", "index_name", required=True, help="Index name.")
@click.option("--key", "keys", multiple=True, required=True, help="Item key (repeatable).")
@click.pass_obj
def delete(c, index_name, keys) -> None:
    """Delete items by key."""
    count = c.delete(index_name, list(keys))
    click.echo(json.dumps({"index": index_name, "deleted": len(keys), "count": count}))


@client.command()
@model_options
@input_options
@out_option
@click.pass_obj
def reconstruct(c, model, version, pngs, texts, npy, out) -> None:
    """Inputs -> their reconstructions through the code (reconstructed.npy, PNGs for image models)."""
    write_outputs(out, "reconstructed", c.reconstruct(model, version=version, return_png=wants_png(c, model, version),
                                                      **gather_inputs(pngs, texts, npy)))


def index_row(info) -> dict:
    return {"name": info.name, "model": info.model, "model_version": info.model_version, "dim": info.dim,
            "metric": info.metric, "factory": info.factory, "count": info.count, "trained": info.trained,
            **({"note": info.note} if info.note else {})}


@client.command()
@click.pass_obj
def indexes(c) -> None:
    """List served indexes (and the ones that could not be served) as JSON."""
    resp = c.list_indexes()
    click.echo(json.dumps({"indexes": [index_row(i) for i in resp.indexes],
                           "broken": [{"path": b.path, "error": b.error} for b in resp.broken]}, indent=1))


@client.command()
@click.option("--index", "index_name", required=True, help="Index name.")
@click.pass_obj
def stats(c, index_name) -> None:
    """Model, metric, factory, count and training state of one served index, as JSON."""
    click.echo(json.dumps(index_row(c.index_stats(index_name)), indent=1))


@client.command()
@click.option("--index", "index_name", required=True, help="Index name.")
@click.option("--key", required=True, help="Item key.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Also write the code as code.npy in this folder.")
@click.pass_obj
def get(c, index_name, key, out) -> None:
    """One stored item: its key, payload and code, as JSON."""
    vector, payload = c.get_item(index_name, key)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        np.save(Path(out) / "code.npy", vector)
    click.echo(json.dumps({"key": key, "payload": payload, "code": [round(float(v), 6) for v in np.ravel(vector)]}))
