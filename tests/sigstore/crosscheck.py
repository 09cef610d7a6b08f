#!/usr/bin/env python3
"""Independent cross-check of the Sigstore fixtures with sigstore-python.

For every fixture in fixtures/manifest.json this verifies, fully offline,
against fixtures/trusted_root.json:

  * keyless bundles with the sigstore-python API (Verifier.verify_artifact
    with a policy.Identity) and with its CLI
    (`sigstore --trust-config client_trust_config.json verify identity
    --offline ...`);
  * detached key signatures with `cryptography` (a sigstore dependency; the
    sigstore client itself has no detached-signature-with-key mode);
  * key-based bundles: sigstore-python cannot verify bundles without a
    certificate; the line says so and does not count as a mismatch.

It prints one line per fixture (name, expected, got) and exits 1 on any
mismatch. When the `sigstore` package cannot be imported it prints
"skipped: ..." and exits 0. Network access is disabled in this process and
in the CLI subprocesses (socket connect raises).

Usage: python3 tests/sigstore/crosscheck.py [FIXTURES_DIR] [--no-cli]
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_NO_NET = """
import socket, sys
def _refuse(*a, **k):
    raise OSError("network access disabled by crosscheck.py")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def _disable_network() -> None:
    exec(_NO_NET, {})  # noqa: S102 - fixed code above


def _oneline(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cli_error(stderr: str) -> str:
    """The CLI's reason: the log line after "FAIL: <file>" (rich layout)."""
    lines = [l.rstrip() for l in stderr.splitlines() if l.strip()]
    for i, line in enumerate(lines):
        if "FAIL:" in line and i + 1 < len(lines):
            msg = re.sub(r"^\s*(\[[0-9:]+\])?\s*(ERROR|WARNING)?\s*", "", lines[i + 1])
            return re.sub(r"\s+\S+\.py:\d+$", "", msg)
    return lines[-1] if lines else ""


def main(argv: list[str]) -> int:
    use_cli = "--no-cli" not in argv
    args = [a for a in argv if not a.startswith("--")]
    fixtures = Path(args[0]).resolve() if args else HERE / "fixtures"

    try:
        import sigstore
        from sigstore.errors import Error as SigstoreError
        from sigstore.models import Bundle, TrustedRoot
        from sigstore.verify import Verifier, policy
    except ImportError as exc:
        print(f"skipped: the Python sigstore package cannot be imported ({exc}); "
              "install it with `pip install sigstore` to run the cross-check")
        return 0

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _disable_network()

    manifest = json.loads((fixtures / "manifest.json").read_text())
    trusted_root = TrustedRoot.from_file(str(fixtures / "trusted_root.json"))
    verifier = Verifier(trusted_root=trusted_root)
    trust_config = fixtures / "client_trust_config.json"

    print(f"sigstore-python {sigstore.__version__}, fixtures {fixtures}")
    print(f"{'fixture':44} {'expected':8} {'got':8} detail")

    mismatches = 0
    checked = 0
    for fx in manifest["fixtures"]:
        name = fx["file"]
        expected = fx["expect"]
        artifact = (fixtures / fx["artifact"]).read_bytes()
        results: list[tuple[str, str, str]] = []  # (checker, got, detail)

        if fx["type"] == "keyless-bundle":
            pol = fx["policy"]
            try:
                bundle = Bundle.from_json((fixtures / name).read_bytes())
                verifier.verify_artifact(
                    artifact,
                    bundle,
                    policy.Identity(identity=pol["subject"], issuer=pol["issuer"]),
                )
                results.append(("api", "accept", ""))
            except (SigstoreError, ValueError) as exc:
                results.append(("api", "refuse", f"{type(exc).__name__}: {exc}"))

            if use_cli:
                cmd = [
                    sys.executable, "-c", _NO_NET + "from sigstore._cli import main\n"
                    "sys.argv = ['sigstore'] + sys.argv[1:]\nmain()\n",
                    "--trust-config", str(trust_config),
                    "verify", "identity", "--offline",
                    "--bundle", str(fixtures / name),
                    "--cert-identity", pol["subject"],
                    "--cert-oidc-issuer", pol["issuer"],
                    str(fixtures / fx["artifact"]),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})
                got = "accept" if proc.returncode == 0 else "refuse"
                detail = _cli_error(proc.stderr) if got == "refuse" else ""
                results.append(("cli", got, detail))

        elif fx["type"] == "detached-signature":
            pub = serialization.load_pem_public_key((fixtures / fx["policy"]["publicKey"]).read_bytes())
            import base64
            sig = base64.b64decode((fixtures / name).read_text().strip())
            try:
                pub.verify(sig, artifact, ec.ECDSA(hashes.SHA256()))
                results.append(("cryptography", "accept", ""))
            except InvalidSignature:
                results.append(("cryptography", "refuse", "InvalidSignature"))

        elif fx["type"] == "key-bundle":
            try:
                Bundle.from_json((fixtures / name).read_bytes())
                detail = "parsed, but sigstore-python has no key-based bundle verification"
            except (SigstoreError, ValueError) as exc:
                detail = f"{type(exc).__name__}: {exc}"
            print(f"{name:44} {expected:8} {'n/a':8} not verifiable by sigstore-python ({_oneline(detail, 100)})")
            continue
        else:
            print(f"{name:44} {expected:8} {'n/a':8} unknown fixture type {fx['type']}")
            continue

        for checker, got, detail in results:
            checked += 1
            ok = got == expected
            mismatches += 0 if ok else 1
            label = name if checker in ("api", "cryptography") else f"  (cli)"
            flag = "" if ok else "  <-- MISMATCH"
            extra = f" [{checker}]" if checker == "cryptography" else ""
            print(f"{label:44} {expected:8} {got:8}{extra} {_oneline(detail)}{flag}")

    print(f"{checked - mismatches} passed, {mismatches} failed")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
