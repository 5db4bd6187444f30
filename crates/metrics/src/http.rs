//! The smallest HTTP/1.1 responder a Prometheus scraper needs: `GET /metrics` gets the text
//! format, any other path 404, anything unparseable 400, and every connection is closed after
//! one answer.
//!
//! The port may be reached by anyone who can reach the host, so the request is bounded in size
//! and time, connections are bounded in number, and nothing it reads can panic it.

use crate::Registry;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Largest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a connection has to send its request head and take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more connections are closed at once.
const MAX_CONNECTIONS: usize = 32;
/// After answering, how long and how much unread input is drained before closing.
const LINGER: Duration = Duration::from_millis(250);
const LINGER_DRAIN: usize = 64 * 1024;

/// Binds `addr` and serves `registry` there in a background task; returns the bound address.
pub async fn bind_and_serve(addr: SocketAddr, registry: Arc<Registry>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, registry));
    Ok(local)
}

/// Answers scrapes on `listener` forever.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(IO_TIMEOUT, answer(stream, &registry)).await;
            if let Ok(Err(e)) = r {
                tracing::debug!(%peer, error = %e, "metrics: connection failed");
            }
            drop(slot);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadRequest,
}

/// Reads the head (up to the blank line or EOF) within [`MAX_REQUEST`] bytes; `None` if longer.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if head_end(&buf).is_some() {
            return Ok(Some(buf));
        }
        if buf.len() >= MAX_REQUEST {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // A request line alone, then EOF, is still a request (`printf 'GET /metrics' | nc`);
            // nothing at all gets nothing back.
            return Ok(Some(buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Route::BadRequest;
    };
    match parts.next() {
        None => {}
        Some(v) if v.starts_with("HTTP/1.") && parts.next().is_none() => {}
        Some(_) => return Route::BadRequest,
    }
    let path = target.split('?').next().unwrap_or("");
    if method == "GET" && path == "/metrics" {
        Route::Metrics
    } else if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        Route::BadRequest
    } else {
        Route::NotFound
    }
}

async fn answer(mut stream: TcpStream, registry: &Arc<Registry>) -> io::Result<()> {
    let route = match read_head(&mut stream).await? {
        Some(head) if head.is_empty() => return Ok(()),
        Some(head) => route(&head),
        None => Route::BadRequest,
    };
    let (status, content_type, body) = match route {
        Route::Metrics => {
            // Gauges may read a database: off the async workers.
            let r = registry.clone();
            match tokio::task::spawn_blocking(move || r.render()).await {
                Ok(text) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text),
                Err(_) => ("500 Internal Server Error", "text/plain; charset=utf-8", "rendering failed\n".into()),
            }
        }
        Route::NotFound => {
            ("404 Not Found", "text/plain; charset=utf-8", "not found; metrics are at /metrics\n".into())
        }
        Route::BadRequest => ("400 Bad Request", "text/plain; charset=utf-8", "bad request\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await?;
    // Read what the client still sends before closing, so the close is a FIN after the answer
    // and not a reset that could destroy it.
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    let drain = async {
        while drained < LINGER_DRAIN {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/9 extra\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"get /metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
    }

    async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(req).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_scrapes_and_survives_garbage() {
        let mut r = Registry::new();
        r.counter("np_test_total", "A test counter.").add(5);
        let addr = bind_and_serve("127.0.0.1:0".parse().expect("addr"), Arc::new(r)).await.expect("bind");
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("\r\n\r\n# HELP np_test_total A test counter.\n"), "{ok}");
        assert!(ok.contains("\nnp_test_total 5\n"), "{ok}");
        assert!(exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(exchange(addr, &[0u8; 100]).await.starts_with("HTTP/1.1 400"));
        assert!(exchange(addr, &vec![b'A'; 20_000]).await.starts_with("HTTP/1.1 400"));
        assert!(exchange(addr, b"").await.is_empty());
        let again = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(again.contains("\nnp_test_total 5\n"), "still serving: {again}");
    }
}
