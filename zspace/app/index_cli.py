"""`zspace index build|import|search|stats|field add`: latent indexes on local disk, no server needed."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from zspace.data import SPEC_HELP
from zspace.errors import NotFound, UserError


def parse_where(values: tuple[str, ...]):
    """Repeated --where conditions (all must hold) as one filter; FilterError naming the bad one."""
    from zspace.index.filters import as_filter, parse_condition

    return as_filter([parse_condition(v, f"--where {v!r}") for v in values or ()])


WHERE_HELP = ("Payload filter FIELD OP VALUE, OP one of = == != < <= > >= in; as label=3, 'year>=2000', "
              "'cat in (1, 2)'. VALUE as JSON, else a string. Repeat for AND.")
FIELD_HELP = ("Index a payload field, NAME:TYPE with TYPE keyword, int, float or bool (repeatable): filters on it "
              "never parse payloads.")


def hits_json(hits) -> str:
    """Search results as the CLI prints them (index search and client search alike)."""
    return json.dumps([[{"key": h.key, "distance": round(h.distance, 6), "payload": h.payload} for h in row]
                       for row in hits], indent=1)


def query_options(f):
    f = click.option("--where", multiple=True, help=WHERE_HELP)(f)
    f = click.option("-k", "k", type=click.IntRange(min=1), default=10, help="Neighbours per query.")(f)
    f = click.option("--npy", type=click.Path(exists=True, dir_okay=False), default=None, help="Latent codes [n, dim] as a .npy file (for raw inputs use --png or --text).")(f)
    f = click.option("--text", "texts", multiple=True, help="A document query (repeatable).")(f)
    f = click.option("--png", "pngs", multiple=True, type=click.Path(exists=True, dir_okay=False), help="An image query (repeatable).")(f)
    return click.option("--key", default=None, help="Query with the code of this stored item.")(f)


@click.group("index", context_settings={"show_default": True})
def index_group() -> None:
    """Build and query latent indexes on local disk."""


@index_group.command()
@click.option("--model", "model_ref", type=click.Path(exists=True, file_okay=False), required=True,
              help="models/NAME (highest version) or models/NAME/VERSION.")
@click.option("--data", required=True, help=f"Data set: {SPEC_HELP}.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Index folder to create, e.g. indexes/NAME.")
@click.option("--factory", default=None,
              help="FAISS factory string: Flat, HNSW32, IVF256,Flat, IVF256,PQ8 ... (milvus: Flat, HNSW<M>, IVF<n>,Flat). "
                   "Hash models (metric hamming): BFlat or BHNSW32. Default: Flat (faiss), BFlat (hamming), HNSW32 (milvus).")
@click.option("--metric", type=click.Choice(["auto", "l2", "cosine", "hamming"]), default="auto",
              help="auto: hamming for a hash model's bits, cosine for texts, l2 otherwise.")
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="train", help="Which split to store.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, help="Rows per encoder call.")
@click.option("--backend", type=click.Choice(["faiss", "milvus"]), default="faiss",
              help="faiss: FAISS + SQLite in the folder; milvus: a Milvus collection the folder names.")
@click.option("--uri", default=None, help="milvus: a milvus-lite file, e.g. indexes/NAME/milvus.db (recorded relative to the index folder) "
                                          "or a server, e.g. http://host:19530.")
@click.option("--collection", default=None, help="milvus: the collection name (default: the folder's name).")
@click.option("--field", "fields", multiple=True, help=FIELD_HELP)
def build(model_ref, data, out, factory, metric, split, batch_size, backend, uri, collection, fields) -> None:
    """Encode a data set's split with the exported encoder and store the codes."""
    from zspace.index.build import build_index
    from zspace.index.contract import IndexSpec

    spec = IndexSpec(backend=backend, factory=factory, metric=None if metric == "auto" else metric, uri=uri,
                     collection=collection, fields=tuple(fields))
    index = build_index(Path(model_ref), data, Path(out), spec, split=split, batch_size=batch_size)
    click.echo(json.dumps({"index": out, **index.stats()}, indent=1))
    index.close()


@index_group.command("import")
@click.option("--model", "model_ref", type=click.Path(exists=True, file_okay=False), required=True,
              help="models/NAME (highest version) or models/NAME/VERSION: whose codes these are.")
@click.option("--codes", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Latent codes [n, latent_dim] as .npy (float; a hash model's packed bits as uint8).")
@click.option("--keys", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Item keys, one per line, in the codes' order.")
@click.option("--payloads", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Payloads, one JSON object per line, in the codes' order (default: empty payloads).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Index folder to create, e.g. indexes/NAME.")
@click.option("--factory", default=None, help="FAISS factory string (as for build). Default: Flat (faiss), HNSW32 (milvus).")
@click.option("--metric", type=click.Choice(["auto", "l2", "cosine", "hamming"]), default="auto",
              help="auto: hamming for a hash model's bits, cosine for text models, l2 otherwise.")
@click.option("--field", "fields", multiple=True, help=FIELD_HELP)
@click.option("--backend", type=click.Choice(["faiss", "milvus"]), default="faiss", help="As for build.")
@click.option("--uri", default=None, help="milvus: a milvus-lite file or a server URI (as for build).")
@click.option("--collection", default=None, help="milvus: the collection name (default: the folder's name).")
def import_(model_ref, codes, keys, payloads, out, factory, metric, fields, backend, uri, collection) -> None:
    """Make an index of codes computed elsewhere (whole or not at all)."""
    from zspace.index.contract import IndexSpec
    from zspace.index.importing import import_codes

    spec = IndexSpec(backend=backend, factory=factory, metric=None if metric == "auto" else metric, uri=uri,
                     collection=collection, fields=tuple(fields))
    index = import_codes(Path(model_ref), Path(codes), Path(keys), Path(payloads) if payloads else None, Path(out), spec)
    click.echo(json.dumps({"index": out, **index.stats()}, indent=1))
    index.close()


@index_group.group("field")
def field_group() -> None:
    """Payload indexes: declared, typed payload fields that filters read without parsing payloads."""


@field_group.command("add")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("fields", nargs=-1, required=True)
def field_add(index_dir, fields) -> None:
    """Index payload fields NAME:TYPE (keyword, int, float, bool) over the items already stored.

    Every stored payload is checked first; a value of another type refuses the whole
    declaration, naming the item. A running server picks the new index up on its next search."""
    from zspace.index.backends import open_index

    index = open_index(Path(index_dir))
    try:
        index.add_fields(list(fields))
        click.echo(json.dumps({"index": index_dir, "fields": index.fields}, indent=1))
    finally:
        index.close()


@index_group.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@query_options
@click.option("--models", type=click.Path(file_okay=False), default="models", help="Model repository, to encode --png/--text.")
@click.option("--explain", is_flag=True, help="Print the filter's query plan (matching items, indexed or scanned "
                                              "fields, exact or ANN); with a query, the hits too.")
def search(index_dir, key, pngs, texts, npy, k, where, models, explain) -> None:
    """Nearest stored items to a stored key, raw inputs, or codes; JSON out."""
    from zspace.index.backends import open_index
    from zspace.index.build import query_codes

    where = parse_where(where)
    index = open_index(Path(index_dir), snapshots=False)
    plan = index.explain(where, k) if explain else None
    if explain and key is None and npy is None and not pngs and not texts:
        click.echo(json.dumps({"plan": plan}, indent=1))
        return
    if key is not None:
        try:
            queries = index.get(key).vector[None]
        except NotFound as exc:
            raise UserError(f"--key: {exc}") from None
    elif npy is not None:
        queries = np.load(npy).astype(np.float32)
    elif pngs or texts:
        queries = query_codes(index, Path(models), pngs, texts)
    else:
        raise click.UsageError("give a query: --key, --png, --text or --npy")
    hits = index.search(queries, k, where)
    if plan is not None:
        click.echo(json.dumps({"plan": plan, "hits": json.loads(hits_json(hits))}, indent=1))
    else:
        click.echo(hits_json(hits))


@index_group.command()
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
def stats(index_dir) -> None:
    """Model, metric, factory, count and training state of an index."""
    from zspace.index.backends import open_index

    index = open_index(Path(index_dir), snapshots=False)
    click.echo(json.dumps(index.stats(), indent=1))
    index.release()


@index_group.command("map")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--method", type=click.Choice(["pca", "umap", "tsne"]), default="pca",
              help="Projection to 2-D: pca (linear, fast at any size), umap or tsne (neighbourhoods; fitted on a "
                   "sample, the rest placed by their nearest fitted codes).")
@click.option("--sample", type=click.IntRange(min=3), default=None,
              help="Codes to fit on (default: pca 200000, umap 20000, tsne 5000); the others are placed.")
@click.option("--seed", type=int, default=0, help="Seed of the sample and the projection.")
def map_(index_dir, method, sample, seed) -> None:
    """Make the 2-D map of an index's codes that the web explorer draws (map.npz in the index folder).

    A server keeps the map current: items written later are placed on it, deleted ones
    leave it. Run it again to refit (after many writes, or to change the method)."""
    from zspace.index.backends import open_index
    from zspace.index.maps import map_index

    index = open_index(Path(index_dir), snapshots=False)
    try:
        m = map_index(index, method, sample, seed)
    finally:
        index.release()
    click.echo(json.dumps({"index": index_dir, **m.info()}, indent=1))
