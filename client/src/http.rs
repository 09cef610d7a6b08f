//! The HTTP exchange with the inference server, on `ureq`: blocking
//! HTTP/1.1 with a keep-alive connection pool, `https://` through rustls
//! (Mozilla's roots from `webpki-roots`), proxies from `HTTPS_PROXY` /
//! `HTTP_PROXY` / `ALL_PROXY` (and `NO_PROXY`), no redirects (the client talks
//! to the one server it was given). Response bodies are readers that hand
//! bytes on as soon as they arrive, so a streamed reply is read incrementally;
//! dropping one before its end closes the connection (which is how a client
//! cancels a generation).

use crate::ClientError;
use std::io::Read;
use std::time::Duration;

/// A parsed `http(s)://host[:port][/base]` server URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseUrl {
    /// Scheme and authority, e.g. `https://example.test:8443`.
    origin: String,
    /// The base path without a trailing `/` (may be empty).
    base_path: String,
}

impl BaseUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::InvalidUrl(format!("{url:?}: {why}"));
        let uri: ureq::http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("only http:// and https:// URLs are supported")),
        }
        let authority = uri.authority().ok_or_else(|| bad("missing host"))?.as_str();
        if authority.contains('@') {
            return Err(bad("user info in the URL is not supported"));
        }
        if uri.host().is_none_or(|h| h.is_empty() || h == "[]") {
            return Err(bad("missing host"));
        }
        // The text after the host's last `:` (outside an IPv6 literal), if any.
        let port = match authority.rfind(']') {
            Some(end) => authority[end + 1..].strip_prefix(':'),
            None => authority.rsplit_once(':').map(|(_, p)| p),
        };
        if port.is_some_and(|p| p.parse::<u16>().is_err()) {
            return Err(bad("bad port"));
        }
        if uri.query().is_some() || url.contains('#') {
            return Err(bad("the base path must not carry a query or fragment"));
        }
        Ok(Self {
            origin: format!("{}://{authority}", uri.scheme_str().unwrap_or("http")),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.origin, self.base_path)
    }
}

/// An HTTP agent (connection pool) with the client's timeouts and TLS roots.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    agent: ureq::Agent,
}

/// Which certificate authorities `https://` servers must chain to.
#[derive(Debug, Clone, Default)]
pub(crate) enum Roots {
    /// Mozilla's (`webpki-roots`).
    #[default]
    WebPki,
    /// Only these (DER certificates), e.g. a deployment's private CA.
    Only(Vec<Vec<u8>>),
}

impl Roots {
    /// The certificates of a PEM file (anything else in it is ignored);
    /// refused when it holds none.
    pub(crate) fn from_pem(pem: &[u8]) -> Result<Self, ClientError> {
        let mut ders = Vec::new();
        for item in ureq::tls::parse_pem(pem) {
            match item.map_err(|e| ClientError::InvalidCaCertificate(e.to_string()))? {
                ureq::tls::PemItem::Certificate(c) => ders.push(c.der().to_vec()),
                _ => continue,
            }
        }
        if ders.is_empty() {
            return Err(ClientError::InvalidCaCertificate(
                "no PEM certificate in it".into(),
            ));
        }
        Ok(Roots::Only(ders))
    }
}

impl Http {
    /// `connect` bounds connecting (and the TLS handshake); `io` bounds each
    /// read and each write (generation may pause between tokens).
    pub(crate) fn new(connect: Duration, io: Duration, roots: &Roots) -> Self {
        let roots = match roots {
            Roots::WebPki => ureq::tls::RootCerts::WebPki,
            Roots::Only(ders) => ureq::tls::RootCerts::new_with_certs(
                &ders
                    .iter()
                    .map(|d| ureq::tls::Certificate::from_der(d).to_owned())
                    .collect::<Vec<_>>(),
            ),
        };
        let config = ureq::Agent::config_builder()
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(connect))
            .timeout_per_read(Some(io))
            .timeout_per_write(Some(io))
            .user_agent(concat!("cinfer-client/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent: config.into(),
        }
    }

    /// Sends one request and returns the response head with its body as a reader.
    pub(crate) fn send(
        &self,
        base: &BaseUrl,
        method: &str,
        path_and_query: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Response, ClientError> {
        let url = format!("{base}{path_and_query}");
        let response = match (method, body) {
            ("GET", None) => self.agent.get(&url).call(),
            ("POST", Some((content_type, bytes))) => self
                .agent
                .post(&url)
                .header("content-type", content_type)
                .send(bytes),
            _ => {
                return Err(ClientError::Http(format!(
                    "{base}: unsupported request {method} (with a body: {})",
                    body.is_some()
                )));
            }
        }
        .map_err(|e| transport(base, e))?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Response {
            status,
            content_type,
            body: Body {
                reader: response.into_body().into_reader(),
            },
        })
    }
}

/// A failed exchange, as the client reports it: a well-formedness problem
/// of the response is `Http`, anything else (connecting, TLS, timeouts, I/O) `Io`.
fn transport(base: &BaseUrl, e: ureq::Error) -> ClientError {
    match e {
        ureq::Error::Protocol(_) | ureq::Error::Http(_) => {
            ClientError::Http(format!("{base}: {e}"))
        }
        _ => ClientError::Io(format!("{base}: {e}")),
    }
}

/// A response: status, content type, and the body as a reader.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Body,
}

/// A response body. `read` returns bytes as soon as the server has sent them.
pub(crate) struct Body {
    reader: ureq::BodyReader<'static>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Body")
    }
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Body {
    /// Reads the whole body, refusing more than `max` bytes.
    pub(crate) fn read_limited(&mut self, max: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.take(max as u64 + 1).read_to_end(&mut out)?;
        if out.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("response body over {max} bytes"),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base_urls() {
        let u = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (u.origin.as_str(), u.base_path.as_str()),
            ("http://127.0.0.1:8080", "")
        );
        let u = BaseUrl::parse("http://example.test/api/").unwrap();
        assert_eq!(
            (u.origin.as_str(), u.base_path.as_str()),
            ("http://example.test", "/api")
        );
        let u = BaseUrl::parse("https://example.test:8443/v").unwrap();
        assert_eq!(u.to_string(), "https://example.test:8443/v");
        let u = BaseUrl::parse("http://[::1]:9/").unwrap();
        assert_eq!(u.to_string(), "http://[::1]:9");
        let u = BaseUrl::parse("http://[::1]").unwrap();
        assert_eq!(u.to_string(), "http://[::1]");
        for (bad, why) in [
            ("ftp://x", "only http:// and https://"),
            ("x:80", "only http:// and https://"),
            ("http://", "not a URL"),
            ("http://h:notaport", "bad port"),
            ("http://h:70000", "bad port"),
            ("http://u@h", "user info"),
            ("http://h/?q", "query or fragment"),
            ("http://h/#f", "query or fragment"),
        ] {
            match BaseUrl::parse(bad) {
                Err(ClientError::InvalidUrl(m)) => assert!(m.contains(why), "{bad}: {m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
