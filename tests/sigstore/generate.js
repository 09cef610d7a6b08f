#!/usr/bin/env node
'use strict';
// Offline generator of Sigstore test fixtures for cinfer.
//
//   node generate.js fixtures [--out DIR] [--time ISO] [--fresh-root]
//       Regenerates the whole fixture set (default DIR: ./fixtures).
//
//   node generate.js sign --artifact FILE [--out FILE] [--issuer URL]
//        [--subject URI] [--time ISO|now] [--bundle-version 0.3|0.2]
//        [--key PKCS8.pem] [--trusted-root FILE] [--raw-fulcio-pem]
//       Signs one file (e.g. a Wasm component) keyless-style with the same
//       private test instance as the fixtures (default --out: FILE.sigstore.json),
//       or key-based with --key (bundle with publicKey hint + Rekor entry,
//       plus FILE.sig, a cosign-style detached signature).
//
// Nothing leaves the process: every Fulcio / Rekor call is answered by
// @sigstore/mock handlers through nock, with net connect disabled.

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

const {
  Instance,
  URLS,
  INSTANCE_START,
  INSTANCE_END,
  trustedRoot,
  clientTrustConfig,
  iso,
} = require('./lib/instance');
const { signKeyless, signWithKey, toJSONText, GITHUB_ISSUER } = require('./lib/sign');
const { deriveP256, spkiPEM, pkcs8PEM, keyID, derToPEM } = require('./lib/keys');
const { verifyBundle, verifyDetached, check } = require('./lib/verify');

const DEFAULT_SUBJECT =
  'https://github.com/cinfer/cinfer/.github/workflows/release.yml@refs/heads/main';
const DEFAULT_ISSUER = GITHUB_ISSUER;
const OTHER_SUBJECT =
  'https://github.com/attacker/cinfer/.github/workflows/release.yml@refs/heads/main';
const OTHER_ISSUER = 'https://gitlab.com';
// Fixed signing time of the fixture set (certificate notBefore, SCT).
const DEFAULT_FIXTURE_TIME = '2025-06-02T10:00:00Z';
const LOG_DELAY_S = 3; // Rekor integratedTime = signing time + 3 s
const CERT_LIFETIME_MIN = 10; // fixed by @sigstore/mock (like Fulcio)
const FIRST_LOG_INDEX = 1337; // entries before ours in the test log
const ARTIFACT = Buffer.from(
  'cinfer sigstore test artifact v1\n' +
    'Fixed bytes; the Rust tests sign real Wasm components with the same script.\n'
);
const OTHER_ARTIFACT = Buffer.from('cinfer sigstore test artifact v1 -- a different file\n');

function parseArgs(argv) {
  const args = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) {
      args._.push(a);
      continue;
    }
    const key = a.slice(2);
    if (['fresh-root', 'raw-fulcio-pem', 'help'].includes(key)) {
      args[key] = true;
    } else {
      if (i + 1 >= argv.length) throw new Error(`missing value for ${a}`);
      args[key] = argv[++i];
    }
  }
  return args;
}

function sha256hex(b) {
  return crypto.createHash('sha256').update(b).digest('hex');
}

function addSeconds(d, s) {
  return new Date(d.getTime() + s * 1000);
}

function writeFile(dir, name, data) {
  fs.writeFileSync(path.join(dir, name), data);
}

// Root certificate already pinned in DIR/trusted_root.json, if it belongs to
// the derived trusted instance: regenerating then leaves trusted_root.json
// byte-for-byte unchanged (the ECDSA signature of a new root would differ).
function pinnedRootDER(trustedRootPath) {
  if (!trustedRootPath || !fs.existsSync(trustedRootPath)) return undefined;
  const tr = JSON.parse(fs.readFileSync(trustedRootPath, 'utf8'));
  const raw = tr.certificateAuthorities?.[0]?.certChain?.certificates?.[0]?.rawBytes;
  return raw ? Buffer.from(raw, 'base64') : undefined;
}

async function trustedInstance(rootPath) {
  const der = pinnedRootDER(rootPath);
  const inst = new Instance('trusted');
  try {
    return await inst.init(der);
  } catch (e) {
    if (!der) throw e;
    console.error(`note: ${rootPath} does not belong to this instance; minting a new root`);
    return new Instance('trusted').init();
  }
}

// ---------------------------------------------------------------------------
// Tampering helpers (operate on the JSON text of a v0.3 bundle)

function clone(x) {
  return JSON.parse(JSON.stringify(x));
}

function flipByteB64(b64, index) {
  const buf = Buffer.from(b64, 'base64');
  const i = index < 0 ? buf.length + index : index;
  buf[i] ^= 0x01;
  return buf.toString('base64');
}

function tamperCheckpointSignature(envelope) {
  // Last line: "\u2014 <name> <base64(keyhint || signature)>"
  const lines = envelope.split('\n');
  const i = lines.length - 2; // envelope ends with "\n"
  const parts = lines[i].split(' ');
  parts[2] = flipByteB64(parts[2], -1); // last byte of the DER signature (s)
  lines[i] = parts.join(' ');
  return lines.join('\n');
}

// ---------------------------------------------------------------------------

async function generateFixtures(args) {
  const out = path.resolve(args.out || path.join(__dirname, 'fixtures'));
  fs.mkdirSync(out, { recursive: true });
  const T = new Date(args.time || DEFAULT_FIXTURE_TIME);
  const logTime = addSeconds(T, LOG_DELAY_S);
  const identity = {
    issuer: args.issuer || DEFAULT_ISSUER,
    subject: args.subject || DEFAULT_SUBJECT,
  };

  const trusted = await trustedInstance(args['fresh-root'] ? undefined : path.join(out, 'trusted_root.json'));
  trusted.startLog(FIRST_LOG_INDEX);
  const untrusted = await new Instance('untrusted').init();
  untrusted.startLog(FIRST_LOG_INDEX + 500);

  const root = trustedRoot(trusted);
  const rootText = JSON.stringify(root, null, 2) + '\n';

  const fixtures = []; // manifest entries
  const files = {}; // name -> Buffer/string to write

  files['artifact.bin'] = ARTIFACT;
  files['other-artifact.bin'] = OTHER_ARTIFACT;
  files['trusted_root.json'] = rootText;
  files['client_trust_config.json'] = JSON.stringify(clientTrustConfig(trusted), null, 2) + '\n';
  files['fulcio_root.pem'] = derToPEM(trusted.rootDER, 'CERTIFICATE');
  files['rekor.pub'] = spkiPEM(trusted.rekorKeys.publicKey);
  files['ctfe.pub'] = spkiPEM(trusted.ctKeys.publicKey);

  let keyCounter = 0;
  const keyless = (o) =>
    signKeyless({
      artifact: ARTIFACT,
      issuer: identity.issuer,
      subject: identity.subject,
      signingKey: deriveP256(`trusted/ephemeral/${keyCounter++}`),
      caInstance: trusted,
      ctInstance: trusted,
      rekorInstance: trusted,
      certTime: T,
      logTime,
      ...o,
    });
  const keylessPolicy = { issuer: identity.issuer, subject: identity.subject };
  const add = (e) => fixtures.push({ bundleVersion: e.type === 'detached-signature' ? undefined : '0.3', artifact: 'artifact.bin', ...e });

  // -- the good bundle, v0.3 and v0.2 --------------------------------------
  const good = await keyless({});
  files['artifact.sigstore.json'] = toJSONText(good, '0.3');
  files['artifact.v02.sigstore.json'] = toJSONText(good, '0.2');
  add({
    file: 'artifact.sigstore.json', type: 'keyless-bundle', policy: keylessPolicy,
    expect: 'accept', reason: 'ok',
    change: 'none: the reference bundle (v0.3, message signature over artifact.bin)',
  });
  add({
    file: 'artifact.v02.sigstore.json', type: 'keyless-bundle', bundleVersion: '0.2', policy: keylessPolicy,
    expect: 'accept', reason: 'ok',
    change: 'same signature and log entry as artifact.sigstore.json, bundle v0.2 (x509CertificateChain with the leaf)',
  });
  // The good bundle verifies other-artifact.bin? No: that is wrong-artifact below.
  const goodJSON = JSON.parse(files['artifact.sigstore.json']);
  const entry = goodJSON.verificationMaterial.tlogEntries[0];

  // -- tampered copies of the good bundle ----------------------------------
  const tampered = (name, mutate, change, reason, detail) => {
    const b = clone(goodJSON);
    mutate(b, b.verificationMaterial.tlogEntries[0]);
    files[name] = JSON.stringify(b, null, 2) + '\n';
    add({ file: name, type: 'keyless-bundle', policy: keylessPolicy, expect: 'refuse', reason, change, detail });
  };
  tampered(
    'tampered-integrated-time.sigstore.json',
    (b, e) => { e.integratedTime = String(Number(e.integratedTime) + 1); },
    `tlogEntries[0].integratedTime ${entry.integratedTime} -> ${Number(entry.integratedTime) + 1} (still inside the certificate's validity)`,
    'transparency-proof-invalid',
    'the signed entry timestamp (SET) no longer verifies'
  );
  tampered(
    'tampered-log-index.sigstore.json',
    (b, e) => { e.logIndex = String(Number(e.logIndex) + 1); },
    `tlogEntries[0].logIndex ${entry.logIndex} -> ${Number(entry.logIndex) + 1} (inclusionProof.logIndex unchanged)`,
    'transparency-proof-invalid',
    'the SET no longer verifies (and logIndex no longer equals inclusionProof.logIndex)'
  );
  tampered(
    'tampered-inclusion-proof.sigstore.json',
    (b, e) => { e.inclusionProof.hashes[2] = flipByteB64(e.inclusionProof.hashes[2], 0); },
    'tlogEntries[0].inclusionProof.hashes[2]: lowest bit of its first byte flipped',
    'transparency-proof-invalid',
    'the Merkle path no longer leads to rootHash (checkpoint and SET still valid)'
  );
  tampered(
    'tampered-proof-log-index.sigstore.json',
    (b, e) => { e.inclusionProof.logIndex = String(Number(e.inclusionProof.logIndex) + 1); },
    `tlogEntries[0].inclusionProof.logIndex ${entry.inclusionProof.logIndex} -> ${Number(entry.inclusionProof.logIndex) + 1}`,
    'transparency-proof-invalid',
    'the Merkle path, applied at another index, no longer leads to rootHash'
  );
  tampered(
    'tampered-checkpoint.sigstore.json',
    (b, e) => { e.inclusionProof.checkpoint.envelope = tamperCheckpointSignature(e.inclusionProof.checkpoint.envelope); },
    'tlogEntries[0].inclusionProof.checkpoint: last byte of the note signature flipped',
    'transparency-proof-invalid',
    'the checkpoint signature does not verify under the Rekor key'
  );

  // -- signed differently ---------------------------------------------------
  const signed = async (name, opts, fixture) => {
    const b = await keyless(opts);
    files[name] = toJSONText(b, '0.3');
    add({ file: name, type: 'keyless-bundle', policy: keylessPolicy, expect: 'refuse', ...fixture });
  };
  await signed('wrong-artifact.sigstore.json', { artifact: OTHER_ARTIFACT }, {
    reason: 'signature-mismatch',
    change: 'a valid bundle for other-artifact.bin (same signer), checked against artifact.bin',
    detail: 'messageDigest and signature do not match the bytes of artifact.bin (verifies against other-artifact.bin)',
  });
  await signed('untrusted-ca.sigstore.json', { caInstance: untrusted }, {
    reason: 'untrusted-ca',
    change: 'certificate issued by a second CA (own key, same DN "CN=sigstore,O=sigstore.mock", not in trusted_root.json); SCT from the trusted CT log, entry in the trusted Rekor',
    detail: 'the certificate chain does not lead to a trusted root',
  });
  await signed('other-identity.sigstore.json', { subject: OTHER_SUBJECT }, {
    reason: 'identity-not-in-policy',
    change: `certificate subject (SAN URI) ${OTHER_SUBJECT}; everything else valid`,
    detail: 'valid signature, but the SAN is not the expected identity',
  });
  await signed('other-issuer.sigstore.json', { issuer: OTHER_ISSUER }, {
    reason: 'identity-not-in-policy',
    change: `OIDC issuer extension ${OTHER_ISSUER}; same subject; everything else valid`,
    detail: 'valid signature, but the issuer is not the expected one',
  });
  await signed('expired-cert.sigstore.json', { certTime: addSeconds(T, -2 * CERT_LIFETIME_MIN * 60) }, {
    reason: 'cert-expired-at-signing-time',
    change: `certificate valid ${iso(addSeconds(T, -2 * CERT_LIFETIME_MIN * 60))} .. ${iso(addSeconds(T, -CERT_LIFETIME_MIN * 60))}; integratedTime ${iso(logTime)}`,
    detail: 'the log entry (signing time) is after the certificate expired',
  });
  await signed('not-yet-valid-cert.sigstore.json', { certTime: addSeconds(T, CERT_LIFETIME_MIN * 60) }, {
    reason: 'cert-not-yet-valid-at-signing-time',
    change: `certificate valid ${iso(addSeconds(T, CERT_LIFETIME_MIN * 60))} .. ${iso(addSeconds(T, 2 * CERT_LIFETIME_MIN * 60))}; integratedTime ${iso(logTime)}`,
    detail: 'the log entry (signing time) is before the certificate became valid',
  });
  await signed('untrusted-ctlog.sigstore.json', { ctInstance: untrusted }, {
    reason: 'sct-invalid',
    change: 'embedded SCT signed by a CT log that is not in trusted_root.json (CA, Rekor trusted)',
    detail: 'no SCT verifies under a trusted CT log key',
  });
  await signed('untrusted-rekor.sigstore.json', { rekorInstance: untrusted }, {
    reason: 'transparency-proof-invalid',
    change: 'entry logged in a Rekor whose key is not in trusted_root.json (same URL and checkpoint origin as the trusted one)',
    detail: 'SET and checkpoint do not verify under a trusted log key (log ID unknown)',
  });

  // -- key-based path (cosign --key style) ----------------------------------
  const cosignKey = deriveP256('trusted/cosign-key');
  const otherKey = deriveP256('untrusted/cosign-key');
  files['cosign.key.pem'] = pkcs8PEM(cosignKey.privateKey);
  files['cosign.pub'] = spkiPEM(cosignKey.publicKey);
  files['other-key.key.pem'] = pkcs8PEM(otherKey.privateKey);
  files['other-key.pub'] = spkiPEM(otherKey.publicKey);
  const keyPolicy = { publicKey: 'cosign.pub' };
  const detached = (key, data) => crypto.sign('sha256', data, key.privateKey).toString('base64') + '\n';

  files['artifact.bin.sig'] = detached(cosignKey, ARTIFACT);
  add({
    file: 'artifact.bin.sig', type: 'detached-signature', policy: keyPolicy, expect: 'accept', reason: 'ok',
    change: 'none: base64 DER ECDSA-P256-SHA256 signature over artifact.bin by cosign.key.pem (cosign sign-blob --key format)',
  });
  files['key-wrong-artifact.sig'] = detached(cosignKey, OTHER_ARTIFACT);
  add({
    file: 'key-wrong-artifact.sig', type: 'detached-signature', policy: keyPolicy, expect: 'refuse', reason: 'signature-mismatch',
    change: 'signature by cosign.key.pem over other-artifact.bin',
    detail: 'signature does not verify over artifact.bin',
  });
  files['key-untrusted.sig'] = detached(otherKey, ARTIFACT);
  add({
    file: 'key-untrusted.sig', type: 'detached-signature', policy: keyPolicy, expect: 'refuse', reason: 'identity-not-in-policy',
    change: 'signature over artifact.bin by other-key.key.pem (a key that is not in the policy)',
    detail: 'does not verify under cosign.pub; verifies under other-key.pub',
  });

  const hint = (k) => keyID(k.publicKey).toString('base64');
  const keyBundle = async (key) =>
    signWithKey({ artifact: ARTIFACT, signingKey: key, hint: hint(key), rekorInstance: trusted, logTime });
  files['artifact.key.sigstore.json'] = toJSONText(await keyBundle(cosignKey), '0.3');
  add({
    file: 'artifact.key.sigstore.json', type: 'key-bundle', policy: keyPolicy, expect: 'accept', reason: 'ok',
    change: 'none: v0.3 bundle, publicKey hint = base64(SHA-256(SPKI DER of cosign.pub)), message signature, hashedrekord entry with the public key in the trusted Rekor',
  });
  files['key-untrusted.sigstore.json'] = toJSONText(await keyBundle(otherKey), '0.3');
  add({
    file: 'key-untrusted.sigstore.json', type: 'key-bundle', policy: keyPolicy, expect: 'refuse', reason: 'identity-not-in-policy',
    change: 'same as artifact.key.sigstore.json but signed (and logged) with other-key',
    detail: 'the key is not the policy key (its hint matches no trusted key; the signature does not verify under cosign.pub)',
  });

  // -- self-check with sigstore-js, then write ------------------------------
  const byName = (n) => (typeof files[n] === 'string' ? Buffer.from(files[n]) : files[n]);
  let failures = 0;
  for (const f of fixtures) {
    const artifact = byName(f.artifact);
    let r;
    if (f.type === 'detached-signature') {
      r = check(() => verifyDetached(files[f.file], artifact, files[f.policy.publicKey]));
    } else {
      const pol = f.policy.publicKey ? { publicKeyPEM: files[f.policy.publicKey] } : f.policy;
      r = check(() => verifyBundle(root, JSON.parse(files[f.file]), artifact, pol));
    }
    const got = r.ok ? 'accept' : 'refuse';
    const checker = f.type === 'detached-signature' ? 'node crypto' : 'sigstore-js';
    f.selfCheck = `${checker}: ${r.ok ? 'accept' : `refuse: ${r.error}`}`;
    const ok = got === f.expect;
    if (!ok) failures++;
    console.log(`${ok ? 'ok  ' : 'FAIL'} ${f.file.padEnd(42)} expected ${f.expect.padEnd(6)} self-check: ${f.selfCheck}`);
  }
  // Sanity: the wrong-artifact bundle is a good bundle for other-artifact.bin.
  const wa = check(() => verifyBundle(root, JSON.parse(files['wrong-artifact.sigstore.json']), OTHER_ARTIFACT, keylessPolicy));
  if (!wa.ok) {
    failures++;
    console.log(`FAIL wrong-artifact.sigstore.json does not verify against other-artifact.bin: ${wa.error}`);
  }
  if (failures) throw new Error(`${failures} fixture(s) did not behave as expected with sigstore-js; nothing written`);

  const goodEntry = goodJSON.verificationMaterial.tlogEntries[0];
  const meta = {
    generator: 'tests/sigstore/generate.js',
    identity,
    signingTime: iso(T),
    integratedTime: iso(logTime),
    certificateValidity: `${iso(T)} .. ${iso(addSeconds(T, CERT_LIFETIME_MIN * 60))}`,
    instance: {
      fulcio: URLS.fulcio,
      rekor: URLS.rekor,
      ctlog: URLS.ctlog,
      validFor: `${iso(INSTANCE_START)} .. (open); root certificate ${iso(INSTANCE_START)} .. ${iso(INSTANCE_END)}`,
      rekorLogId: trusted.rekorLogID.toString('hex'),
      ctLogId: trusted.ctLogID.toString('hex'),
    },
    goodEntry: {
      logIndex: goodEntry.logIndex,
      treeSize: goodEntry.inclusionProof.treeSize,
      proofHashes: goodEntry.inclusionProof.hashes.length,
    },
    artifactSha256: sha256hex(ARTIFACT),
    otherArtifactSha256: sha256hex(OTHER_ARTIFACT),
    libraries: libraryVersions(),
  };
  files['manifest.json'] = JSON.stringify({ ...meta, fixtures }, null, 2) + '\n';
  files['MANIFEST.md'] = manifestMarkdown(meta, fixtures);

  for (const [name, data] of Object.entries(files)) writeFile(out, name, data);
  console.log(`wrote ${Object.keys(files).length} files to ${out}`);
}

function libraryVersions() {
  const lock = JSON.parse(fs.readFileSync(path.join(__dirname, 'package-lock.json'), 'utf8'));
  const v = (n) => lock.packages[`node_modules/${n}`]?.version;
  return Object.fromEntries(
    ['@sigstore/mock', '@sigstore/sign', '@sigstore/bundle', '@sigstore/verify', '@sigstore/protobuf-specs', 'nock', '@peculiar/x509']
      .map((n) => [n, v(n)])
  );
}

const REASONS = {
  ok: 'accept',
  'signature-mismatch': 'signature does not match the bytes',
  'untrusted-ca': 'untrusted CA',
  'identity-not-in-policy': 'identity (or key) not in policy',
  'transparency-proof-invalid': 'transparency proof invalid',
  'cert-expired-at-signing-time': 'certificate expired at signing time',
  'cert-not-yet-valid-at-signing-time': 'certificate not yet valid at signing time',
  'sct-invalid': 'SCT not from a trusted CT log',
};

function manifestMarkdown(meta, fixtures) {
  const row = (f) => {
    const verdict = f.expect === 'accept' ? '**accept**' : `**refuse**: ${REASONS[f.reason]} (\`${f.reason}\`)`;
    const what = [f.change, f.detail].filter(Boolean).join('. ');
    const pol = f.policy.publicKey ? `key \`${f.policy.publicKey}\`` : 'identity below';
    const esc = (t) => t.replace(/\|/g, '\\|');
    return `| \`${f.file}\` | ${f.type}${f.bundleVersion ? ` v${f.bundleVersion}` : ''} | ${pol} | ${verdict} | ${esc(what)} | ${esc(f.selfCheck)} |`;
  };
  return `# Sigstore test fixtures

Generated by \`scripts/make-sigstore-fixtures\` (\`tests/sigstore/generate.js\`); do not edit by
hand. Everything here is signed by a **private test instance whose keys are public** (derived
from fixed labels in \`tests/sigstore/lib/keys.js\`): never trust this \`trusted_root.json\`
outside tests. \`manifest.json\` holds the same table for programs (\`crosscheck.py\` reads it).

## Verification parameters

- Artifact: \`artifact.bin\` (sha256 \`${meta.artifactSha256}\`); \`other-artifact.bin\`
  (sha256 \`${meta.otherArtifactSha256}\`) is only used for the wrong-artifact cases.
- Trust root: \`trusted_root.json\` (media type \`application/vnd.dev.sigstore.trustedroot+json;version=0.1\`):
  one CA (\`${meta.instance.fulcio}\`, self-signed root, DN \`CN=sigstore,O=sigstore.mock\`), one Rekor
  (\`${meta.instance.rekor}\`, log ID \`${meta.instance.rekorLogId}\`), one CT log
  (\`${meta.instance.ctlog}\`, log ID \`${meta.instance.ctLogId}\`), no TSA. Valid for
  ${meta.instance.validFor}. The same material as PEM: \`fulcio_root.pem\`, \`rekor.pub\`, \`ctfe.pub\`.
  \`client_trust_config.json\` wraps it with a signing config for \`sigstore --trust-config\`.
- Expected keyless identity: OIDC issuer \`${meta.identity.issuer}\`, certificate SAN (URI)
  \`${meta.identity.subject}\` (exact match).
- Key-based path: public key \`cosign.pub\` (ECDSA P-256, SPKI PEM, as \`cosign generate-key-pair\`
  writes it); private key \`cosign.key.pem\` (unencrypted PKCS#8, test only). \`other-key.*\` is a key
  that is not in the policy.
- Times: certificate issued ${meta.signingTime} (valid ${meta.certificateValidity}, 10 minutes, as
  with Fulcio), SCT at issuance, Rekor \`integratedTime\` ${meta.integratedTime}. All fixed; the
  certificate is long expired *now*, so a verifier must check validity at the signing time
  (integratedTime, authenticated by the SET), never at the current time.
- Transparency log: the good entry is leaf ${meta.goodEntry.logIndex} of a tree of size
  ${meta.goodEntry.treeSize} (inclusion proof of ${meta.goodEntry.proofHashes} hashes); \`logIndex\` equals
  \`inclusionProof.logIndex\` (one unsharded log). Entries of one run are appended to one log, so all
  checkpoints of the run are consistent.
- Every ECDSA signature differs between regenerations (random nonces); keys, names, times, log
  indices and \`trusted_root.json\` do not change.

## Fixtures

Each negative is the good case with exactly one thing changed. \`type\`: keyless-bundle = Fulcio
certificate + SCT + Rekor entry; key-bundle = public-key hint + Rekor entry; detached-signature =
base64 DER signature over the artifact.

| file | type | policy | a verifier must answer | what is different | self-check at generation |
| --- | --- | --- | --- | --- | --- |
${fixtures.map(row).join('\n')}

The last column is what sigstore-js (\`@sigstore/verify\` ${meta.libraries['@sigstore/verify']}; Node's
crypto for detached signatures) answered when the set was generated; the generator refuses to
write a set where it differs from the expected verdict. The independent check with
sigstore-python is \`tests/sigstore/crosscheck.py\`.

## Library versions

${Object.entries(meta.libraries).map(([k, v]) => `- \`${k}\` ${v}`).join('\n')}
`;
}

// ---------------------------------------------------------------------------

async function signOne(args) {
  if (!args.artifact) throw new Error('sign: --artifact FILE is required');
  const artifact = fs.readFileSync(args.artifact);
  const version = args['bundle-version'] || '0.3';
  if (!['0.2', '0.3'].includes(version)) throw new Error('--bundle-version must be 0.2 or 0.3');
  const rootPath = path.resolve(args['trusted-root'] || path.join(__dirname, 'fixtures', 'trusted_root.json'));
  const time = !args.time || args.time === 'now' ? new Date(Math.floor(Date.now() / 1000) * 1000) : new Date(args.time);
  if (Number.isNaN(time.getTime())) throw new Error(`bad --time ${args.time}`);
  const digest = crypto.createHash('sha256').update(artifact).digest();

  const trusted = await trustedInstance(rootPath);
  // Log position derived from the artifact digest: stable for the same file.
  trusted.startLog(2000 + (digest.readUInt32BE(0) % 20000));
  const root = trustedRoot(trusted);
  if (!fs.existsSync(rootPath)) {
    fs.mkdirSync(path.dirname(rootPath), { recursive: true });
    fs.writeFileSync(rootPath, JSON.stringify(root, null, 2) + '\n');
    console.error(`wrote ${rootPath}`);
  }

  const out = args.out || `${args.artifact}.sigstore.json`;
  let bundle;
  let policy;
  if (args.key) {
    const privateKey = crypto.createPrivateKey(fs.readFileSync(args.key));
    const publicKey = crypto.createPublicKey(privateKey);
    const key = { privateKey, publicKey };
    const hint = keyID(publicKey).toString('base64');
    bundle = await signWithKey({ artifact, signingKey: key, hint, rekorInstance: trusted, logTime: time });
    const sigPath = `${args.artifact}.sig`;
    fs.writeFileSync(sigPath, crypto.sign('sha256', artifact, privateKey).toString('base64') + '\n');
    console.error(`wrote ${sigPath}`);
    policy = { publicKeyPEM: spkiPEM(publicKey) };
  } else {
    const issuer = args.issuer || DEFAULT_ISSUER;
    const subject = args.subject || DEFAULT_SUBJECT;
    bundle = await signKeyless({
      artifact,
      issuer,
      subject,
      signingKey: deriveP256(`trusted/ephemeral/sign/${digest.toString('hex')}/${time.getTime()}`),
      caInstance: trusted,
      ctInstance: trusted,
      rekorInstance: trusted,
      certTime: time,
      logTime: addSeconds(time, LOG_DELAY_S),
      rawFulcioPEM: !!args['raw-fulcio-pem'],
    });
    policy = { issuer, subject };
  }
  const text = toJSONText(bundle, version);
  const r = check(() => verifyBundle(root, JSON.parse(text), artifact, policy));
  if (!r.ok && !args['raw-fulcio-pem']) throw new Error(`self-check failed: ${r.error}`);
  fs.writeFileSync(out, text);
  console.error(`wrote ${out} (bundle v${version}, sigstore-js self-check: ${r.ok ? 'ok' : r.error})`);
}

const USAGE = `usage:
  node generate.js fixtures [--out DIR] [--time ISO] [--issuer URL] [--subject URI] [--fresh-root]
  node generate.js sign --artifact FILE [--out FILE] [--issuer URL] [--subject URI]
                        [--time ISO|now] [--bundle-version 0.3|0.2] [--key PKCS8.pem]
                        [--trusted-root FILE] [--raw-fulcio-pem]
`;

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const cmd = args._[0];
  if (args.help || !cmd) {
    process.stdout.write(USAGE);
    return;
  }
  if (cmd === 'fixtures') return generateFixtures(args);
  if (cmd === 'sign') return signOne(args);
  throw new Error(`unknown command ${cmd}\n${USAGE}`);
}

main().catch((e) => {
  console.error(`error: ${e.stack || e.message}`);
  process.exit(1);
});
