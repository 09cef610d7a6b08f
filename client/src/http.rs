//! A small blocking HTTP/1.1 client over `std::net::TcpStream`: one request
//! per connection (`Connection: close`), plain `http://` only, bounded header
//! and body sizes, and a chunked-transfer decoder that hands bytes on as soon
//! as they arrive (so a streamed reply is read incrementally).

use crate::ClientError;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest response head (status line and headers) accepted.
const MAX_HEAD_BYTES: u64 = 64 * 1024;
/// Largest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: u64 = 1024;
/// Largest trailer section accepted after the last chunk.
const MAX_TRAILER_BYTES: u64 = 16 * 1024;

/// A parsed `http://host[:port][/base]` server URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseUrl {
    host: String,
    port: u16,
    base_path: String,
}

impl BaseUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::InvalidUrl(format!("{url:?}: {why}"));
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only plain http:// URLs are supported (local development)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("missing host (or user info, which is not supported)"));
        }
        if path.contains(['?', '#']) || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "the base path must not carry a query, fragment or spaces",
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or_else(|| bad("unclosed IPv6 literal"))?;
            let port = &v6[end + 1..];
            let port = match port.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if port.is_empty() => 80,
                None => return Err(bad("junk after IPv6 literal")),
            };
            (format!("[{}]", &v6[..end]), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_owned(), 80),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(bad("missing host"));
        }
        Ok(Self {
            host,
            port,
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }

    fn host_header(&self) -> String {
        if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.base_path)
    }
}

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) io: Duration,
}

/// A response: status, content type, and the body as a reader.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Body,
}

#[derive(Debug)]
enum Framing {
    /// Chunked: bytes left in the current chunk; `done` after the last chunk.
    Chunked { left: u64, done: bool },
    /// Content-Length: bytes left.
    Length(u64),
    /// Delimited by the connection closing.
    Close,
}

/// A response body. `read` returns bytes as soon as the server has sent them.
#[derive(Debug)]
pub(crate) struct Body {
    stream: BufReader<TcpStream>,
    framing: Framing,
}

fn proto(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Reads one CRLF- (or LF-) terminated line of at most `limit` bytes.
fn read_line(r: &mut impl BufRead, limit: u64, what: &str) -> std::io::Result<String> {
    let mut line = Vec::new();
    let n = r.take(limit).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("connection closed while reading {what}"),
        ));
    }
    if line.last() != Some(&b'\n') {
        if n as u64 >= limit {
            return Err(proto(format!("{what} too long")));
        }
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("connection closed while reading {what}"),
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| proto(format!("{what} is not UTF-8")))
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match &mut self.framing {
            Framing::Close => self.stream.read(buf),
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.stream.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed before the end of the body",
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::Chunked { left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let line = read_line(&mut self.stream, MAX_CHUNK_LINE, "chunk size")?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size =
                        u64::from_str_radix(size, 16).map_err(|_| proto("malformed chunk size"))?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        let mut total = 0u64;
                        loop {
                            let t = read_line(&mut self.stream, MAX_CHUNK_LINE, "trailer")?;
                            total += t.len() as u64 + 2;
                            if total > MAX_TRAILER_BYTES {
                                return Err(proto("trailers too long"));
                            }
                            if t.is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                    *left = size;
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.stream.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed inside a chunk",
                    ));
                }
                *left -= n as u64;
                if *left == 0 {
                    let end = read_line(&mut self.stream, 2, "chunk end")?;
                    if !end.is_empty() {
                        return Err(proto("chunk not followed by CRLF"));
                    }
                }
                Ok(n)
            }
        }
    }
}

impl Body {
    /// Reads the whole body, refusing more than `max` bytes.
    pub(crate) fn read_limited(&mut self, max: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.take(max as u64 + 1).read_to_end(&mut out)?;
        if out.len() > max {
            return Err(proto(format!("response body over {max} bytes")));
        }
        Ok(out)
    }
}

/// Sends one request and reads the response head.
pub(crate) fn send(
    base: &BaseUrl,
    timeouts: Timeouts,
    method: &str,
    path_and_query: &str,
    body: Option<(&str, &[u8])>,
) -> Result<Response, ClientError> {
    let io = |e: std::io::Error| ClientError::Io(format!("{base}: {e}"));
    let addrs = (
        base.host.trim_start_matches('[').trim_end_matches(']'),
        base.port,
    )
        .to_socket_addrs()
        .map_err(io)?;
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeouts.connect) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(io(e)),
        (None, None) => {
            return Err(ClientError::Io(format!("{base}: host has no address")));
        }
    };
    stream.set_read_timeout(Some(timeouts.io)).map_err(io)?;
    stream.set_write_timeout(Some(timeouts.io)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;

    let mut head = format!(
        "{method} {}{path_and_query} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
         User-Agent: cinfer-client/{}\r\nAccept: */*\r\n",
        base.base_path,
        base.host_header(),
        env!("CARGO_PKG_VERSION")
    );
    if let Some((content_type, bytes)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    head.push_str("\r\n");
    let mut w = &stream;
    w.write_all(head.as_bytes()).map_err(io)?;
    if let Some((_, bytes)) = body {
        w.write_all(bytes).map_err(io)?;
    }
    w.flush().map_err(io)?;

    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut budget = MAX_HEAD_BYTES;
    let http = |m: &str| ClientError::Http(format!("{base}: {m}"));
    loop {
        let status_line = read_line(&mut reader, budget, "status line").map_err(io)?;
        budget = budget.saturating_sub(status_line.len() as u64 + 2);
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(http("not an HTTP/1.x response"));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|s| (100..600).contains(s))
            .ok_or_else(|| http("malformed status line"))?;
        let mut content_type = None;
        let mut content_length = None;
        let mut chunked = false;
        loop {
            if budget == 0 {
                return Err(http("response head too large"));
            }
            let line = read_line(&mut reader, budget, "header").map_err(io)?;
            budget = budget.saturating_sub(line.len() as u64 + 2);
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| http("malformed header line"))?;
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-type" => content_type = Some(value.to_owned()),
                "content-length" => {
                    let n: u64 = value.parse().map_err(|_| http("bad Content-Length"))?;
                    if content_length.is_some_and(|c| c != n) {
                        return Err(http("conflicting Content-Length headers"));
                    }
                    content_length = Some(n);
                }
                "transfer-encoding" => {
                    let last = value.rsplit(',').next().unwrap_or("").trim();
                    if last.eq_ignore_ascii_case("chunked") {
                        chunked = true;
                    } else {
                        return Err(http("unsupported Transfer-Encoding"));
                    }
                }
                _ => {}
            }
        }
        if (100..200).contains(&status) {
            // Interim response (e.g. 100 Continue): the real one follows.
            continue;
        }
        let framing = if chunked {
            Framing::Chunked {
                left: 0,
                done: false,
            }
        } else if let Some(n) = content_length {
            Framing::Length(n)
        } else if method == "HEAD" || status == 204 || status == 304 {
            Framing::Length(0)
        } else {
            Framing::Close
        };
        return Ok(Response {
            status,
            content_type,
            body: Body {
                stream: reader,
                framing,
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base_urls() {
        let u = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("127.0.0.1", 8080, "")
        );
        let u = BaseUrl::parse("http://example.test/api/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("example.test", 80, "/api")
        );
        let u = BaseUrl::parse("http://[::1]:9/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 9));
        assert_eq!(u.to_string(), "http://[::1]:9");
        for bad in [
            "https://x",
            "x:80",
            "http://",
            "http://h:notaport",
            "http://u@h",
            "http://h/?q",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
