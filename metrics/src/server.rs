//! The `/metrics` HTTP listener: HTTP/1.1 (hyper), `GET /metrics` only.
//! Each scrape calls the daemon's render function on tokio's blocking
//! pool, so it may take the daemon's locks without stalling the runtime.
//!
//! [`MetricsServer`] runs in the caller's tokio runtime (shipper,
//! receiver); [`MetricsThread`] brings its own thread and current-thread
//! runtime for a daemon that is not async (the tracker).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::exposition::{Exposition, Format};

/// Builds the exposition of one scrape.
pub type Render = Arc<dyn Fn() -> Exposition + Send + Sync>;

/// The longest a client may hold a connection (a scrape takes
/// milliseconds; this bounds idle keep-alive connections).
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);

/// A `/metrics` listener running as a task of the current tokio runtime;
/// stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks one) and serves `render`'s metrics on
    /// `GET /metrics`. Must be called within a tokio runtime.
    pub async fn bind(addr: SocketAddr, render: Render) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, render));
        Ok(MetricsServer { addr, task })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `/metrics` listener on its own thread with a current-thread tokio
/// runtime; stops (and joins the thread) when dropped.
#[derive(Debug)]
pub struct MetricsThread {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsThread {
    /// Binds `addr` now (so a bad address is reported to the caller) and
    /// serves `render`'s metrics from a new thread named `metrics`.
    pub fn spawn(addr: SocketAddr, render: Render) -> std::io::Result<MetricsThread> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics listener unusable; no metrics");
                            return;
                        }
                    };
                    tokio::select! {
                        () = serve(listener, render) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(MetricsThread {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: TcpListener, render: Render) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, render.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
            }
        });
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn respond(
    req: Request<Incoming>,
    render: Render,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Ok(r);
    }
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    let body = match tokio::task::spawn_blocking(move || render().render(format)).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "collecting metrics failed");
            return Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "collecting metrics failed\n",
            ));
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(format.content_type()),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::labels;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn render() -> Render {
        Arc::new(|| {
            let mut e = Exposition::new();
            e.counter(
                "tidemark_test_scrapes",
                "Scrapes.",
                None,
                &labels(&[("host", "h")]),
                3,
            );
            e
        })
    }

    #[test]
    fn thread_server_answers_metrics_and_refuses_the_rest() {
        let server = MetricsThread::spawn("127.0.0.1:0".parse().unwrap(), render()).unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        let r = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("application/openmetrics-text"), "{r}");
        assert!(
            r.contains("tidemark_test_scrapes_total{host=\"h\"} 3\n"),
            "{r}"
        );
        assert!(r.ends_with("# EOF\n"), "{r}");

        let r = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
        );
        assert!(r.contains("text/plain; version=0.0.4"), "{r}");
        assert!(
            r.contains("# TYPE tidemark_test_scrapes_total counter"),
            "{r}"
        );

        let r = get(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        // Garbage is answered with an error or a close, never a crash.
        let r = get(addr, "\x00\x01 nonsense\r\n\r\n");
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
        let r = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(
            r.starts_with("HTTP/1.1 200"),
            "still serving after garbage: {r}"
        );

        drop(server);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "stopped on drop"
        );
    }

    #[test]
    fn a_taken_address_is_an_error() {
        let server = MetricsThread::spawn("127.0.0.1:0".parse().unwrap(), render()).unwrap();
        let again = MetricsThread::spawn(server.local_addr(), render());
        assert!(again.is_err());
    }

    #[tokio::test]
    async fn async_server_serves_in_the_callers_runtime() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), render())
            .await
            .unwrap();
        let addr = server.local_addr();
        let r = tokio::task::spawn_blocking(move || {
            get(
                addr,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        })
        .await
        .unwrap();
        assert!(
            r.contains("tidemark_test_scrapes_total{host=\"h\"} 3\n"),
            "{r}"
        );
    }
}
