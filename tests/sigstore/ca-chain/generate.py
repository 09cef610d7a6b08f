#!/usr/bin/env python3
"""Trust roots whose certificate authority is an intermediate under an outer root, for the
chain-validity tests of the Rust verifier (issue 16, bug 3).

The leaf of ../fixtures/artifact.sigstore.json was issued by the test instance's Fulcio key
(label `trusted/fulcio-root` in ../lib/keys.js) under the name `CN=sigstore,O=sigstore.mock`.
Each intermediate here carries that same key and name, so the same leaf, SCT and Rekor entry
chain to it; it is signed by an outer root (label `trusted/outer-root`). Only the validity
windows differ between the trust roots written:

  trusted_root.valid-intermediate.json        intermediate 2025-01-01 .. 2035-01-01  -> accept
  trusted_root.expired-intermediate.json      intermediate 2024-01-01 .. 2025-05-01  -> refuse
  trusted_root.not-yet-valid-intermediate.json intermediate 2025-07-01 .. 2035-01-01 -> refuse
  trusted_root.expired-root.json              valid intermediate, outer root
                                              2020-01-01 .. 2025-05-01               -> refuse
                                              (sigstore-python 4.5.1 accepts this one: it
                                              stops the path at the first trusted
                                              certificate and never checks the root's dates)

The signing time (integratedTime) of artifact.sigstore.json is 2025-06-02T10:00:03Z. Every
CA keeps `validFor.start` 2020-01-01 with no end, so the trust root's window is never the reason.

Each trust root is a copy of ../fixtures/trusted_root.json with certificateAuthorities[0]
replaced. With sigstore-python importable (the venv of scripts/setup), the expected verdict of
every trust root is first checked with it, fully offline; the script refuses to write a set in
which sigstore-python's verdict is not the one recorded here for it.

Needs `cryptography` (a sigstore-python dependency). Certificates differ on every run (ECDSA
nonces are random); keys, names, serials and times are fixed.

Usage: python3 tests/sigstore/ca-chain/generate.py
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import json
import socket
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def derive_p256(label: str) -> ec.EllipticCurvePrivateKey:
    """The same derivation as ../lib/keys.js deriveP256."""
    ctr = 0
    while True:
        d = hashlib.sha256(f"cinfer-sigstore-test-key/v1/{label}/{ctr}".encode()).digest()
        n = int.from_bytes(d, "big")
        if 0 < n < P256_ORDER:
            return ec.derive_private_key(n, ec.SECP256R1())
        ctr += 1


def t(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def serial(label: str) -> int:
    return int.from_bytes(hashlib.sha256(f"cinfer/ca-chain/{label}".encode()).digest()[:15], "big")


def ca_cert(subject, key_pub, issuer, issuer_key, not_before, not_after, label, path_len):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key_pub)
        .serial_number(serial(label))
        .not_valid_before(t(not_before))
        .not_valid_after(t(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key_pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def main() -> int:
    base_root = json.loads((FIXTURES / "trusted_root.json").read_text())
    pinned = x509.load_der_x509_certificate(
        base64.b64decode(base_root["certificateAuthorities"][0]["certChain"]["certificates"][0]["rawBytes"])
    )
    fulcio = derive_p256("trusted/fulcio-root")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if fulcio.public_key().public_bytes(*spki) != pinned.public_key().public_bytes(*spki):
        sys.exit("the derived trusted/fulcio-root key is not the key of fixtures/trusted_root.json")
    outer = derive_p256("trusted/outer-root")
    outer_name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "cinfer test outer root"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore.mock"),
    ])
    # The leaf's issuer name, with its encoding (PrintableString), copied from the pinned root.
    inter_name = pinned.subject

    def root(label, nb, na):
        return ca_cert(outer_name, outer.public_key(), outer_name, outer, nb, na, label, None)

    def inter(label, nb, na):
        return ca_cert(inter_name, fulcio.public_key(), outer_name, outer, nb, na, label, 0)

    good_root = root("outer-root", "2020-01-01T00:00:00Z", "2035-01-01T00:00:00Z")
    sets = {
        "valid-intermediate": (
            inter("valid-intermediate", "2025-01-01T00:00:00Z", "2035-01-01T00:00:00Z"), good_root, True, True),
        "expired-intermediate": (
            inter("expired-intermediate", "2024-01-01T00:00:00Z", "2025-05-01T00:00:00Z"), good_root, False, False),
        "not-yet-valid-intermediate": (
            inter("not-yet-valid-intermediate", "2025-07-01T00:00:00Z", "2035-01-01T00:00:00Z"), good_root, False, False),
        "expired-root": (
            inter("valid-intermediate", "2025-01-01T00:00:00Z", "2035-01-01T00:00:00Z"),
            root("expired-outer-root", "2020-01-01T00:00:00Z", "2025-05-01T00:00:00Z"), False, True),
    }
    outputs = {}
    # name -> (intermediate, outer root, our verdict, sigstore-python's verdict); True = accept
    for name, (i, r, accept, python_accepts) in sets.items():
        tr = copy.deepcopy(base_root)
        ca = tr["certificateAuthorities"][0]
        ca["subject"] = {"organization": "sigstore.mock", "commonName": "cinfer test outer root"}
        ca["certChain"]["certificates"] = [{"rawBytes": b64(i)}, {"rawBytes": b64(r)}]
        ca["validFor"] = {"start": "2020-01-01T00:00:00Z"}
        outputs[name] = (json.dumps(tr, indent=2) + "\n", accept, python_accepts)

    verdicts = crosscheck(outputs)
    for name, (text, accept, _) in outputs.items():
        (HERE / f"trusted_root.{name}.json").write_text(text)
        ours = "accept" if accept else "refuse"
        print(f"trusted_root.{name}.json  cinfer-signing must {ours}; {verdicts.get(name, '')}")
    return 0


def crosscheck(outputs) -> dict[str, str]:
    """sigstore-python's verdict on ../fixtures/artifact.sigstore.json under each trust root."""
    try:
        from sigstore.models import Bundle, TrustedRoot
        from sigstore.verify import Verifier, policy
    except ImportError:
        print("sigstore-python not importable: verdicts not cross-checked", file=sys.stderr)
        return {}

    def refuse(*a, **k):
        raise OSError("network access disabled")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    import tempfile

    artifact = (FIXTURES / "artifact.bin").read_bytes()
    bundle = Bundle.from_json((FIXTURES / "artifact.sigstore.json").read_text())
    identity = policy.Identity(
        identity="https://github.com/cinfer/cinfer/.github/workflows/release.yml@refs/heads/main",
        issuer="https://token.actions.githubusercontent.com",
    )
    verdicts, bad = {}, []
    for name, (text, _, accept) in outputs.items():
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write(text)
            f.flush()
            try:
                Verifier(trusted_root=TrustedRoot.from_file(f.name)).verify_artifact(
                    artifact, bundle, identity
                )
                got, msg = True, "sigstore-python: accept"
            except Exception as e:  # noqa: BLE001 - any refusal
                got, msg = False, f"sigstore-python: refuse: {e}"
        verdicts[name] = msg
        if got != accept:
            bad.append(f"{name}: expected {'accept' if accept else 'refuse'}, {msg}")
    if bad:
        sys.exit("sigstore-python disagrees:\n" + "\n".join(bad))
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
