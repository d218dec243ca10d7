"""The model repository as the server sees it: loaded bundles, broken ones, hot reload.

A scan compares each version folder's manifest fingerprint with what is
loaded; new or changed bundles are loaded beside the old ones and swapped in
with one assignment, so requests in flight keep the runtime they started with
and finish on it. A bundle that fails to load (bad manifest, wrong hash,
unreadable graph) is reported and skipped; the others serve.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np

from zspace.bundle import Bundle, load_bundle, version_dirs
from zspace.errors import NotFound, UserError, shown
from zspace.runtime import PARITY_TOLERANCE, RuntimeOptions, check_variant, open_runtime, provider_parity
from zspace.service.batcher import DynamicBatcher
from zspace.service.config import MODEL_CONFIG_FILE, BatchConfig, model_serving

log = logging.getLogger("zspace.serve")


class NonFiniteOutput(UserError):
    """Finite inputs so far outside what the model saw (3e38, say) that its outputs overflow."""


def marked(run):
    """A graph run that appends a boolean row mask to its outputs when some value is NaN or infinite.

    Checked once per batch, on the batcher's side, by one sum per output: NaN and inf propagate
    through it. Only a batch whose sum is not finite pays for the exact per-row mask, which the
    batcher slices per request like any output (a sum that merely overflowed finds every row fine)."""
    def go(x: np.ndarray) -> list[np.ndarray]:
        outs = run(x)
        if all(math.isfinite(o.sum()) for o in outs):
            return outs
        ok = np.ones(len(x), dtype=bool)
        for o in outs:
            ok &= np.isfinite(o).reshape(len(o), -1).all(axis=1)
        return [*outs, ok]
    return go


def finite(outs: list[np.ndarray], field: str) -> list[np.ndarray]:
    """A request's outputs, refused if any of its rows was marked non-finite: a NaN code must never be
    answered with OK (or stored)."""
    if outs[-1].dtype == np.bool_:
        if not outs[-1].all():
            raise NonFiniteOutput(f"{field}: the model's output is NaN or infinite for these values "
                                  "(far outside the range it was trained on?)")
        return outs[:-1]
    return outs


class ModelRuntime:
    """One loaded bundle version: its runtime (two ONNX Runtime sessions and the transform) and two batchers."""

    def __init__(self, bundle: Bundle, runtime: RuntimeOptions, batching: BatchConfig, on_batch=None):
        self.bundle = bundle
        self.name, self.version, self.kind, self.modality = bundle.name, bundle.version, bundle.kind, bundle.modality
        self.input_dim, self.latent_dim, self.likelihood = bundle.input_dim, bundle.latent_dim, bundle.likelihood
        self.out_logvar = None if bundle.out_logvar is None else np.asarray(bundle.out_logvar, np.float64)
        self.runtime = open_runtime(bundle, runtime)
        self.transform, self.provider = self.runtime.transform, self.runtime.provider
        # The bundle promises ONNX Runtime within 1e-4 of torch (checked on the CPU at export); on a GPU
        # provider that promise is checked here, at load, against the CPU. TF32, when opted in, breaks it
        # knowingly: the gap is logged instead.
        # A variant (int8, fp16) keeps its own promise instead: within its tolerance of the fp32 graphs on its
        # parity rows, on whichever provider runs it (check_variant raises otherwise).
        self.precision = bundle.precision
        if bundle.precision != "fp32":
            self.parity = check_variant(self.runtime)
        else:
            self.parity = provider_parity(self.runtime)
            if self.parity > PARITY_TOLERANCE and not runtime.cuda_tf32:
                raise UserError(f"{bundle.label}: {self.provider} differs from the CPU by {self.parity:.1e} "
                                f"(the bundle promises {PARITY_TOLERANCE:.0e}); serve it with --device cpu")
        if self.parity:
            log.info("model %s on %s: max |difference| from the CPU %.1e", bundle.label, self.provider, self.parity)
        self.batching = batching
        self._warm_up()
        hook = on_batch or (lambda *a: None)
        self.encode_batcher, self.decode_batcher = (
            DynamicBatcher(run, batching, on_batch=lambda r, q, g=graph: hook(self.name, g, r, q),
                           name=f"ort-{self.name}-{graph}")
            for run, graph in ((marked(self.runtime.encode), "encoder"), (marked(self.runtime.decode), "decoder")))

    @property
    def is_vae(self) -> bool:
        return self.bundle.is_vae

    @property
    def is_hash(self) -> bool:
        return self.bundle.is_hash

    def _warm_up(self) -> None:
        """One real call per graph, so the first client does not pay for initialisation."""
        self.runtime.decode(self.runtime.encode(np.zeros((1, self.input_dim), np.float32))[0])

    async def encode_outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """Every encoder output, in the graph's order: [mean], [mean, logvar] (VAE kinds) or [mean, bits] (hash)."""
        return finite(await self.encode_batcher.submit(x), "inputs")

    async def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(codes, logvar for VAE kinds else None); a hash model's codes are its probabilities."""
        outs = await self.encode_outputs(x)
        return outs[0], (outs[1] if self.is_vae else None)

    async def bits(self, x: np.ndarray) -> np.ndarray:
        """A hash model's codes as bits, packed 8 to a byte (uint8 [batch, latent_dim / 8])."""
        return (await self.encode_outputs(x))[1]

    async def decode(self, z: np.ndarray) -> np.ndarray:
        return finite(await self.decode_batcher.submit(z), "latents")[0]

    def sample_prior(self, count: int, seed: int, temperature: float) -> np.ndarray:
        """Latents from the manifest's prior: N(0, I), or the Gaussian fitted to training codes."""
        rng = np.random.default_rng(seed % 2**64)  # any int64 seed, negative too, names one stream
        eps = rng.standard_normal((count, self.latent_dim)) * temperature
        prior = self.bundle.prior
        if prior["type"] == "gaussian":
            eps = np.asarray(prior["mean"]) + eps @ np.asarray(prior["cholesky"]).T
        return eps.astype(np.float32)

    def close(self) -> None:
        self.encode_batcher.close()
        self.decode_batcher.close()


def fingerprint(version_dir: Path) -> str:
    """Changes when any file of the version changes (name, size, modification time), or the model's serving.json.

    Not just the manifest's bytes: a half-copied bundle whose graphs arrive after its
    manifest, or a graph damaged in place, must be loaded again (and verified) at the
    next rescan, not only after a restart."""
    h = hashlib.sha256()
    try:
        for path in sorted(version_dir.rglob("*")) + [version_dir.parent / MODEL_CONFIG_FILE]:
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(version_dir.parent)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    except OSError:
        return "unreadable"
    return h.hexdigest()


class ModelRepository:
    def __init__(self, root: Path, runtime: RuntimeOptions, batching: BatchConfig, on_batch=None,
                 precision: str | None = None):
        """precision: which version answers for the latest (`ServeConfig.precision`; serving.json per model)."""
        self.root, self.runtime_options = Path(root), runtime
        self.batching, self.on_batch, self.precision = batching, on_batch, precision
        self.preferred: dict[str, str | None] = {}  # model name -> precision that answers version 0
        self.models: dict[str, dict[int, ModelRuntime]] = {}
        self.broken: dict[str, str] = {}  # path -> error
        self._prints: dict[str, str] = {}

    def scan(self) -> tuple[list[str], list[ModelRuntime]]:
        """Load new or changed bundles, drop removed ones.

        Returns what changed (for the log) and the runtimes taken out of service;
        the caller closes those on the event loop's thread, since this may run in another.
        """
        changes: list[str] = []
        retired: list[ModelRuntime] = []
        if not self.root.is_dir():  # unmounted, or renamed for a moment: an error to report, not "unload all"
            log.error("model repository %s is not there; keeping the %d loaded version(s)", self.root, len(self.loaded()))
            return changes, retired
        models = {n: dict(vs) for n, vs in self.models.items()}
        seen = set()
        for vdir in version_dirs(self.root):
            key = vdir.relative_to(self.root).as_posix()  # what ListModels shows: NAME/VERSION, no host paths
            seen.add(key)
            fp = fingerprint(vdir)
            if self._prints.get(key) == fp:
                continue
            self._prints[key] = fp
            name, version = vdir.parent.name, int(vdir.name)
            try:
                bundle = load_bundle(vdir)
                if bundle.name != name or bundle.version != version:
                    raise UserError(f"{vdir}: manifest says {bundle.name}/{bundle.version}, folder says {name}/{version}")
                batching, precision = model_serving(vdir.parent, self.batching, self.precision)
                runtime = ModelRuntime(bundle, self.runtime_options, batching, self.on_batch)
                self.preferred[name] = precision
            except Exception as exc:  # any failure marks this bundle broken; the rest serve
                why = str(exc).replace(f"{self.root}/", "")
                if version in models.get(name, {}):  # a bad replacement never takes down what serves
                    why += "; the version loaded before keeps serving"
                self.broken[key] = why
                log.error("model %s/%s skipped: %s", name, version, why)
                changes.append(f"broken {name}/{version}")
                continue
            self.broken.pop(key, None)
            old = models.setdefault(name, {}).get(version)
            models[name][version] = runtime
            if old:
                retired.append(old)
            log.info("model %s/%s loaded (%s, %s, provider %s)", name, version, runtime.kind, runtime.modality, runtime.provider)
            changes.append(f"{'reloaded' if old else 'loaded'} {name}/{version}")
        for key in [k for k in self._prints if k not in seen]:
            del self._prints[key]
            self.broken.pop(key, None)
            name, version = key.split("/")
            old = models.get(name, {}).pop(int(version), None)
            if old:
                retired.append(old)
                changes.append(f"removed {key}")
        self.models = {n: vs for n, vs in models.items() if vs}  # one assignment: readers see old or new
        return changes, retired

    def get(self, name: str, version: int = 0) -> ModelRuntime:
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"model {shown(name)} is not loaded (loaded: {', '.join(sorted(self.models)) or 'none'})")
        if version == 0:
            return versions[self.latest(name, versions)]
        if version not in versions:
            raise NotFound(f"model {shown(name)} has no version {version} (loaded: {sorted(versions)})")
        return versions[version]

    def latest(self, name: str, versions: dict[int, ModelRuntime] | None = None) -> int:
        """The version that answers for NAME's latest: the highest of the chosen precision where there is one, else
        the highest (a model without an int8 variant still answers under `--precision int8`)."""
        versions = self.models.get(name, {}) if versions is None else versions
        wanted = self.preferred.get(name)
        chosen = [v for v, rt in versions.items() if rt.precision == wanted]
        return max(chosen or versions)

    def loaded(self) -> list[ModelRuntime]:
        return [rt for n in sorted(self.models) for _, rt in sorted(self.models[n].items())]
