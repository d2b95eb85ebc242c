//! The benchmark's baseline: a bare hyper server that answers one fixed 200 on the credentials
//! path, built like iamlinkd's listener (tokio multi-thread runtime, hyper http1 with the same
//! header-read timeout) but with nothing behind it: no mark lookup, no store read, no cache, no
//! logging. scripts/bench serves the same body bytes iamlinkd answered, so the two differ only in
//! the work iamlinkd does per request.
//!
//!     bare_server --listen 198.18.0.3:8182 --path /latest/meta-data/iam/security-credentials/r --body FILE
//!
//! Built on demand: `cargo build --release -p iamlinkd --example bare_server`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

fn usage() -> ! {
    eprintln!("usage: bare_server --listen IP:PORT --path PATH [--body FILE]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut path: Option<String> = None;
    let mut body = Bytes::from_static(b"ok\n");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--listen" => listen = Some(v.parse().unwrap_or_else(|_| usage())),
            "--path" => path = Some(v),
            "--body" => body = Bytes::from(std::fs::read(&v).unwrap_or_else(|e| panic!("{v}: {e}"))),
            _ => usage(),
        }
    }
    let (Some(listen), Some(path)) = (listen, path) else { usage() };
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| panic!("listen {listen}: {e}"));
    let path: &'static str = Box::leak(path.into_boxed_str());
    eprintln!("bare_server listening on {listen}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    let (status, body) = if req.uri().path() == path {
                        (StatusCode::OK, body)
                    } else {
                        (StatusCode::NOT_FOUND, Bytes::new())
                    };
                    let mut r = Response::new(Full::new(body));
                    *r.status_mut() = status;
                    r.headers_mut().insert(CONTENT_TYPE, "text/plain".parse().expect("static header"));
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
