"""Plain helpers the tests share (fixtures live in conftest.py, which tests never import)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write an IDX file (uint8) the way the MNIST files are laid out."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


TOPICS = {
    "space": "orbit rocket launch nasa shuttle moon planet satellite astronaut mission",
    "cars": "engine wheel brake tire dealer sedan mileage transmission motor drive",
    "food": "recipe bake flour oven sugar butter dinner kitchen taste spice",
}


def make_docs(n_per_topic: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for label, words in TOPICS.items():
        vocab = words.split()
        for i in range(n_per_topic):
            text = " ".join(rng.choice(vocab, size=12)) + " and the of it"
            docs.append({"id": f"{label}-{i}", "text": text, "label": label})
    return docs


def train_run(out: Path, stop_after: int | None = None, **overrides) -> Path:
    from zspace.training.train import TrainConfig, train

    cfg = dict(data="digits", model="ae", latent_dim=4, hidden=(32, 16), epochs=2, batch_size=64, seed=0, threads=2)
    cfg.update(overrides)
    return train(TrainConfig(**cfg), out, quiet=True, stop_after=stop_after)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def http_call(url: str, method: str = "GET", json_body=None, data: bytes | None = None, headers: dict | None = None,
              files: list[tuple[str, bytes]] = (), fields: dict | None = None, context=None):
    """One HTTP request with the standard library: (status, headers, body bytes); JSON, raw or multipart bodies."""
    import json
    import urllib.error
    import urllib.request
    import uuid

    headers = dict(headers or {})
    if json_body is not None:
        data, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
    elif files or fields:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (fields or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for i, (name, blob) in enumerate(files):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f{i}.png"\r\n'
                         f'Content-Type: image/png\r\n\r\n'.encode() + blob + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
