'use strict';
// Keyless-style and key-based signing through @sigstore/sign, with every
// HTTP call answered in-process by the @sigstore/mock handlers via nock.
// Network connections are disabled for the whole process: a request that no
// mock answers fails instead of leaving the machine.

const crypto = require('crypto');
const nock = require('nock');
const { fulcioHandler, rekorHandler } = require('@sigstore/mock');
const {
  FulcioSigner,
  RekorWitness,
  MessageSignatureBundleBuilder,
} = require('@sigstore/sign');
const { bundleToJSON, BUNDLE_V02_MEDIA_TYPE, BUNDLE_V03_MEDIA_TYPE } = require('@sigstore/bundle');

const { URLS } = require('./instance');
const { FixedKeySigner, derToPEM } = require('./keys');

nock.disableNetConnect();

const GITHUB_ISSUER = 'https://token.actions.githubusercontent.com';
// Claim that carries the certificate SAN for the mock Fulcio (its
// `subjectClaim` option). Real Fulcio derives the SAN from issuer-specific
// claims (job_workflow_ref for GitHub); the mock takes one claim verbatim.
const SAN_CLAIM = 'cinfer_san';
const FETCH = { retry: 0, timeout: 10000 };

function b64url(x) {
  return Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');
}

// An unsigned JWT: the mock Fulcio decodes the claims without verifying
// them (as documented for `strict: true`).
function makeJWT(claims) {
  return `${b64url({ alg: 'none', typ: 'JWT' })}.${b64url(claims)}.`;
}

// OIDC claims as a CI would present them. For a GitHub Actions workflow
// identity the GitHub claims are filled in too, so the certificate carries the
// usual Fulcio extensions (source repository, ref, workflow, ...).
function identityClaims(issuer, subject, time) {
  const iat = Math.floor(time.getTime() / 1000);
  const claims = {
    iss: issuer,
    aud: 'sigstore',
    iat,
    nbf: iat,
    exp: iat + 300,
    sub: subject,
    [SAN_CLAIM]: subject,
  };
  const m = /^https:\/\/github\.com\/([^/]+)\/([^/]+)\/(\.github\/workflows\/[^@]+)@(.+)$/.exec(subject);
  if (m && issuer === GITHUB_ISSUER) {
    const repo = `${m[1]}/${m[2]}`;
    const ref = m[4];
    const sha = crypto.createHash('sha1').update(`cinfer test commit ${repo}`).digest('hex');
    Object.assign(claims, {
      sub: `repo:${repo}:ref:${ref}`,
      repository: repo,
      repository_owner: m[1],
      repository_id: '100000001',
      repository_owner_id: '100000002',
      repository_visibility: 'public',
      ref,
      sha,
      workflow: m[3].replace(/^.*\//, '').replace(/\.ya?ml$/, ''),
      event_name: 'push',
      job_workflow_ref: `${repo}/${m[3]}@${ref}`,
      job_workflow_sha: sha,
      workflow_ref: `${repo}/${m[3]}@${ref}`,
      workflow_sha: sha,
      runner_environment: 'github-hosted',
      run_id: '4242',
      run_attempt: '1',
    });
  }
  return claims;
}

function intercept(baseURL, handler, transform) {
  nock(baseURL)
    .post(handler.path)
    .reply(async (_uri, body) => {
      const req = typeof body === 'string' ? body : JSON.stringify(body);
      let { statusCode, response, contentType } = await handler.fn(req);
      if (transform && statusCode < 300) response = transform(response);
      return [statusCode, response, { 'Content-Type': contentType || 'text/plain' }];
    });
}

// The mock Fulcio writes each PEM certificate with its base64 on a single
// line. @sigstore/sign copies that PEM verbatim into the Rekor hashedrekord
// body (spec.signature.publicKey.content), while verifiers rebuild the
// expected body from the certificate with standard 64-column PEM (real Fulcio
// emits that) and compare: sigstore-python then refuses the bundle with
// "transparency log entry is inconsistent with other materials". So the
// Fulcio answer is normalised to RFC 7468 PEM before the signer sees it.
function normaliseFulcioPEM(responseJSON) {
  const resp = JSON.parse(responseJSON);
  for (const key of ['signedCertificateEmbeddedSct', 'signedCertificateDetachedSct']) {
    const chain = resp[key] && resp[key].chain;
    if (!chain) continue;
    chain.certificates = chain.certificates.map((pem) => {
      const b64 = pem.replace(/-----(BEGIN|END) CERTIFICATE-----/g, '').replace(/\s+/g, '');
      return derToPEM(Buffer.from(b64, 'base64'), 'CERTIFICATE');
    });
  }
  return JSON.stringify(resp);
}

async function build(builder, artifact) {
  try {
    const bundle = await builder.create({ data: artifact });
    if (!nock.isDone()) throw new Error(`unused mocks: ${nock.pendingMocks()}`);
    return bundle;
  } finally {
    nock.cleanAll();
  }
}

// Keyless: Fulcio certificate (with SCT) for `signingKey`, signature over
// the artifact, Rekor hashedrekord entry. Returns the v0.2 bundle object
// produced by @sigstore/sign.
//
// opts: artifact (Buffer), issuer, subject, signingKey ({privateKey,publicKey}),
//   caInstance, ctInstance, rekorInstance (lib/instance.js Instances),
//   certTime (Date: certificate notBefore and SCT time),
//   logTime (Date: Rekor integratedTime), trailing (filler entries logged
//   after ours; the rekorInstance must have a log: Instance.startLog()).
async function signKeyless(opts) {
  const ctlog = await opts.ctInstance.ctlog(opts.certTime);
  const ca = await opts.caInstance.ca(opts.certTime, ctlog);
  const tlog = await opts.rekorInstance.tlog(opts.logTime);
  nock.cleanAll();
  intercept(
    URLS.fulcio,
    fulcioHandler(ca, { strict: true, subjectClaim: SAN_CLAIM }),
    opts.rawFulcioPEM ? undefined : normaliseFulcioPEM
  );
  intercept(URLS.rekor, rekorHandler(tlog, { strict: true }), (resp) =>
    opts.rekorInstance.reanchor(resp, { trailing: opts.trailing })
  );
  const token = makeJWT(identityClaims(opts.issuer, opts.subject, opts.certTime));
  const signer = new FulcioSigner({
    fulcioBaseURL: URLS.fulcio,
    identityProvider: { getToken: async () => token },
    keyHolder: new FixedKeySigner(opts.signingKey),
    ...FETCH,
  });
  const witness = new RekorWitness({ rekorBaseURL: URLS.rekor, fetchOnConflict: false, ...FETCH });
  return build(new MessageSignatureBundleBuilder({ signer, witnesses: [witness] }), opts.artifact);
}

// Key-based (cosign --key style) bundle: message signature by `signingKey`,
// public key referenced by `hint`, logged in Rekor as hashedrekord with the
// public key. opts: artifact, signingKey, hint, rekorInstance, logTime,
// trailing.
async function signWithKey(opts) {
  const tlog = await opts.rekorInstance.tlog(opts.logTime);
  nock.cleanAll();
  intercept(URLS.rekor, rekorHandler(tlog, { strict: true }), (resp) =>
    opts.rekorInstance.reanchor(resp, { trailing: opts.trailing })
  );
  const signer = new FixedKeySigner(opts.signingKey, opts.hint);
  const witness = new RekorWitness({ rekorBaseURL: URLS.rekor, fetchOnConflict: false, ...FETCH });
  return build(new MessageSignatureBundleBuilder({ signer, witnesses: [witness] }), opts.artifact);
}

// @sigstore/sign emits bundle v0.2 (x509CertificateChain holding the leaf
// only). v0.3 differs in the media type and in carrying the leaf as
// `certificate`.
function toV03(bundle) {
  const vm = bundle.verificationMaterial;
  let content = vm.content;
  if (content.$case === 'x509CertificateChain') {
    content = { $case: 'certificate', certificate: content.x509CertificateChain.certificates[0] };
  }
  return {
    ...bundle,
    mediaType: BUNDLE_V03_MEDIA_TYPE,
    verificationMaterial: { ...vm, content },
  };
}

function toJSONText(bundle, version) {
  if (version === '0.3') bundle = toV03(bundle);
  else if (bundle.mediaType !== BUNDLE_V02_MEDIA_TYPE) throw new Error('expected a v0.2 bundle');
  return JSON.stringify(bundleToJSON(bundle), null, 2) + '\n';
}

module.exports = {
  GITHUB_ISSUER,
  signKeyless,
  signWithKey,
  toV03,
  toJSONText,
  identityClaims,
};
