//! HTTP between nodes: a small server and client, every message signed and sealed with the
//! keys derived from the registration key (`auth`), except `GET /health`.
//!
//! Routes (protocol 1, see PROTOCOL.md):
//! - `GET /health`: unauthenticated JSON: status, protocol, uptime; no secrets, no data;
//! - `POST /v1/changes`: body a have-vector, answer a batch of what the caller lacks;
//! - `POST /v1/push`: body a batch, answer the receiver's apply counts;
//! - `POST /v1/status`: body `{}`, answer the node's identity, protocol and have-vector;
//! - `POST /v1/snapshot`: body a `snapshot::Ask`, answer a manifest, a page of rows with their
//!   registers, or the vector that covers the copy (joining from a snapshot);
//! - `POST /v1/verify`: body a `verify::Ask`, answer a `verify::Answer`: buckets, rows or
//!   values of a tracked table (comparing tables, `sync_verify`);
//! - `POST /v1/poke`: body `{"port": n}`: "I have new changes, pull from me (at my address,
//!   port n)"; answer `{}`. This is how a commit reaches peers within milliseconds.
//!
//! The server knows nothing of PostgreSQL: it hands requests to a `Node` (the worker answers
//! them on PostgreSQL's main thread) and counts what it rejected, by reason.

use crate::auth::{self, Keys, Rejection, ReplayGuard, Signature};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Header carrying a message's `Signature`.
pub const SIGNATURE_HEADER: &str = "x-peersync-signature";
/// Messages older or newer than this are stale.
pub const REPLAY_WINDOW_MS: u64 = 60_000;
/// The authenticated routes.
const PATHS: [&str; 6] = ["/v1/changes", "/v1/push", "/v1/poke", "/v1/status", "/v1/snapshot", "/v1/verify"];

/// A node's answer: JSON text, passed through as it is (a batch can be large: it is neither
/// parsed nor printed again on its way).
pub type NodeFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// What the server asks of the node it serves.
pub trait Node: Send + Sync + 'static {
    /// A batch of what a peer with have-vector `have` lacks.
    fn changes(&self, have: Value) -> NodeFuture;
    /// Apply a batch a peer pushed; the answer is the apply counts.
    fn push(&self, batch: String) -> NodeFuture;
    /// The node at `from` has new changes.
    fn poke(&self, from: SocketAddr);
    /// The node's status for a peer: identity, protocol and have-vector.
    fn status(&self) -> NodeFuture;
    /// A part of a snapshot of the node's tracked tables (`snapshot::Ask`).
    fn snapshot(&self, ask: crate::snapshot::Ask) -> NodeFuture;
    /// Buckets, rows or values of a tracked table, to compare it (`verify::Ask`).
    fn verify(&self, ask: crate::verify::Ask) -> NodeFuture;
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The additional data a body is sealed with: its message's method, path and signature.
fn aad(method: &str, path: &str, signature: &str) -> Vec<u8> {
    format!("{method} {path} {signature}").into_bytes()
}

/// Sign and seal `plain` as a message; returns (signature header, body).
fn wrap(keys: &Keys, method: &str, path: &str, plain: &[u8]) -> (String, Vec<u8>) {
    // The signature covers the sealed bytes; the seal binds the signature's time and nonce.
    // Sign a placeholder first to fix time and nonce, then seal, then sign the sealed body.
    let ts = now_ms();
    let nonce = auth::new_nonce();
    let sealed = auth::seal(keys, &aad(method, path, &format!("{ts}.{}", auth::hex(&nonce))), plain);
    let sig = Signature::sign_with(keys, method, path, &sealed, ts, nonce);
    (sig.header(), sealed)
}

/// Check and open a message; `guard` rejects replays.
fn unwrap(
    keys: &Keys,
    method: &str,
    path: &str,
    header: Option<&str>,
    body: &[u8],
    guard: &Mutex<ReplayGuard>,
) -> Result<Vec<u8>, Rejection> {
    let sig = Signature::parse(header.ok_or(Rejection::Malformed)?)?;
    sig.verify(keys, method, path, body, now_ms(), &mut guard.lock().expect("guard lock"))?;
    auth::open(keys, &aad(method, path, &format!("{}.{}", sig.ts_ms, auth::hex(&sig.nonce))), body)
}

/// Rejections and traffic, for `sync_status()`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Counters {
    pub requests: u64,
    pub rejected: BTreeMap<&'static str, u64>,
}

struct Server<N> {
    keys: Keys,
    node: Arc<N>,
    guard: Mutex<ReplayGuard>,
    counters: Arc<Mutex<Counters>>,
    started: Instant,
}

fn respond(status: StatusCode, body: Vec<u8>, signature: Option<String>) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(status);
    if let Some(s) = signature {
        r = r.header(SIGNATURE_HEADER, s);
    }
    r.body(Full::new(Bytes::from(body))).expect("a valid response")
}

impl<N: Node> Server<N> {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, remote: SocketAddr) -> Response<Full<Bytes>> {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        if method == Method::GET && path == "/health" {
            let body = json!({"status": "ok", "protocol": auth::PROTOCOL_VERSION,
                              "uptime_s": self.started.elapsed().as_secs()});
            return respond(StatusCode::OK, body.to_string().into_bytes(), None);
        }
        if method != Method::POST || !PATHS.contains(&path.as_str()) {
            return respond(StatusCode::NOT_FOUND, Vec::new(), None);
        }
        self.counters.lock().expect("counters").requests += 1;
        let header = req.headers().get(SIGNATURE_HEADER).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let body = match Limited::new(req.into_body(), auth::MAX_BODY as usize).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return self.reject(Rejection::Malformed),
        };
        let plain = match unwrap(&self.keys, method.as_str(), &path, header.as_deref(), &body, &self.guard) {
            Ok(p) => p,
            Err(r) => return self.reject(r),
        };
        let Ok(text) = String::from_utf8(plain) else {
            return self.reject(Rejection::Malformed);
        };
        if path == "/v1/push" {
            let answer = self.node.push(text).await;
            return self.answer(&path, answer);
        }
        let Ok(input) = serde_json::from_str::<Value>(&text) else {
            return self.reject(Rejection::Malformed);
        };
        let answer = match path.as_str() {
            "/v1/changes" => self.node.changes(input).await,
            "/v1/status" => self.node.status().await,
            "/v1/snapshot" => match serde_json::from_value(input) {
                Ok(ask) => self.node.snapshot(ask).await,
                Err(_) => return self.reject(Rejection::Malformed),
            },
            "/v1/verify" => match serde_json::from_value(input) {
                Ok(ask) => self.node.verify(ask).await,
                Err(_) => return self.reject(Rejection::Malformed),
            },
            "/v1/poke" => match input["port"].as_u64().and_then(|p| u16::try_from(p).ok()) {
                Some(port) => {
                    self.node.poke(SocketAddr::new(remote.ip(), port));
                    Ok("{}".to_string())
                }
                None => return self.reject(Rejection::Malformed),
            },
            _ => return respond(StatusCode::NOT_FOUND, Vec::new(), None),
        };
        self.answer(&path, answer)
    }

    fn answer(&self, path: &str, answer: Result<String, String>) -> Response<Full<Bytes>> {
        let (status, out) = match answer {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, json!({"error": e}).to_string()),
        };
        let (sig, sealed) = wrap(&self.keys, "RESPONSE", path, out.as_bytes());
        respond(status, sealed, Some(sig))
    }

    fn reject(&self, r: Rejection) -> Response<Full<Bytes>> {
        *self.counters.lock().expect("counters").rejected.entry(r.as_str()).or_default() += 1;
        // Say no more than that it was refused: the reason is the receiver's business.
        respond(StatusCode::UNAUTHORIZED, Vec::new(), None)
    }
}

/// Serve `node` on `listener` until `shutdown` turns true. Returns the counters it keeps.
pub fn serve<N: Node>(
    listener: TcpListener,
    keys: Keys,
    node: Arc<N>,
    mut shutdown: watch::Receiver<bool>,
) -> (Arc<Mutex<Counters>>, impl Future<Output = ()>) {
    let counters = Arc::new(Mutex::new(Counters::default()));
    let server = Arc::new(Server {
        keys,
        node,
        guard: Mutex::new(ReplayGuard::new(REPLAY_WINDOW_MS)),
        counters: counters.clone(),
        started: Instant::now(),
    });
    let run = async move {
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = listener.accept() => {
                    let Ok((stream, remote)) = accepted else { continue };
                    let server = server.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let server = server.clone();
                            async move { Ok::<_, std::convert::Infallible>(server.handle(req, remote).await) }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                    });
                }
            }
        }
    };
    (counters, run)
}

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("refused by the peer (HTTP {0}): wrong key, clock skew or replay")]
    Refused(u16),
    #[error("the peer's answer was rejected: {0}")]
    BadAnswer(Rejection),
    #[error("the peer could not answer: {0}")]
    Failed(String),
}

/// Bytes of one exchange on the wire (sealed bodies), each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// A client for other nodes' servers.
pub struct Client {
    http: reqwest::Client,
    keys: Keys,
    guard: Mutex<ReplayGuard>,
}

impl Client {
    pub fn new(keys: Keys, timeout: Duration) -> Client {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .expect("an HTTP client");
        Client { http, keys, guard: Mutex::new(ReplayGuard::new(REPLAY_WINDOW_MS)) }
    }

    /// Send `input` (JSON text); the answer's JSON text and the bytes on the wire.
    async fn call(&self, peer: SocketAddr, path: &str, input: &str) -> Result<(String, Traffic), CallError> {
        let (sig, sealed) = wrap(&self.keys, "POST", path, input.as_bytes());
        let sent = sealed.len() as u64;
        let resp = self
            .http
            .post(format!("http://{peer}{path}"))
            .header(SIGNATURE_HEADER, sig)
            .body(sealed)
            .send()
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(CallError::Refused(status.as_u16()));
        }
        let header = resp.headers().get(SIGNATURE_HEADER).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let body = resp.bytes().await.map_err(|e| CallError::Unreachable(e.to_string()))?;
        let plain = unwrap(&self.keys, "RESPONSE", path, header.as_deref(), &body, &self.guard)
            .map_err(CallError::BadAnswer)?;
        let answer = String::from_utf8(plain).map_err(|_| CallError::BadAnswer(Rejection::Malformed))?;
        if status.is_success() {
            Ok((answer, Traffic { sent, received: body.len() as u64 }))
        } else {
            let error: Value = serde_json::from_str(&answer).unwrap_or_default();
            Err(CallError::Failed(error["error"].as_str().unwrap_or("unknown").to_string()))
        }
    }

    /// What `peer` holds that a node with have-vector `have` lacks (a batch, as JSON text),
    /// and the bytes it took.
    pub async fn pull(&self, peer: SocketAddr, have: &Value) -> Result<(String, Traffic), CallError> {
        self.call(peer, "/v1/changes", &have.to_string()).await
    }

    /// Give `peer` a batch; returns its apply counts.
    pub async fn push(&self, peer: SocketAddr, batch: &str) -> Result<Value, CallError> {
        let (answer, _) = self.call(peer, "/v1/push", batch).await?;
        serde_json::from_str(&answer).map_err(|_| CallError::BadAnswer(Rejection::Malformed))
    }

    /// Buckets, rows or values of one of `peer`'s tracked tables, and the bytes it took.
    pub async fn verify(&self, peer: SocketAddr, ask: &crate::verify::Ask) -> Result<(String, Traffic), CallError> {
        self.call(peer, "/v1/verify", &serde_json::to_string(ask).expect("an ask serialises")).await
    }

    /// Tell `peer` this node (serving on `port`) has new changes.
    /// `peer`'s status (identity, protocol, have-vector).
    pub async fn status(&self, peer: SocketAddr) -> Result<Value, CallError> {
        let (answer, _) = self.call(peer, "/v1/status", "{}").await?;
        serde_json::from_str(&answer).map_err(|_| CallError::BadAnswer(Rejection::Malformed))
    }

    /// A part of `peer`'s snapshot, as JSON text, and the bytes it took.
    pub async fn snapshot(&self, peer: SocketAddr, ask: &crate::snapshot::Ask) -> Result<(String, Traffic), CallError> {
        self.call(peer, "/v1/snapshot", &serde_json::to_string(ask).expect("an ask serialises")).await
    }

    pub async fn poke(&self, peer: SocketAddr, port: u16) -> Result<(), CallError> {
        self.call(peer, "/v1/poke", &json!({ "port": port }).to_string()).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "correct horse battery staple";

    /// A node holding one secret row, which records what was pushed to it.
    struct Fake {
        pushed: Mutex<Vec<String>>,
        poked: Mutex<Vec<SocketAddr>>,
    }

    impl Node for Fake {
        fn changes(&self, have: Value) -> NodeFuture {
            Box::pin(async move {
                Ok(json!({"format": 1, "for": have, "events": [{"data": {"name": "Ada Lovelace", "card": "4111-1111"}}]})
                    .to_string())
            })
        }
        fn push(&self, batch: String) -> NodeFuture {
            self.pushed.lock().unwrap().push(batch);
            Box::pin(async { Ok(json!({"applied": 1}).to_string()) })
        }
        fn poke(&self, from: SocketAddr) {
            self.poked.lock().unwrap().push(from);
        }
        fn status(&self) -> NodeFuture {
            Box::pin(async { Ok(json!({"name": "fake", "have": {}}).to_string()) })
        }
        fn snapshot(&self, ask: crate::snapshot::Ask) -> NodeFuture {
            Box::pin(async move { Ok(json!({"asked": ask}).to_string()) })
        }
        fn verify(&self, ask: crate::verify::Ask) -> NodeFuture {
            Box::pin(async move { Ok(json!({"asked": ask}).to_string()) })
        }
    }

    async fn start() -> (SocketAddr, Arc<Fake>, Arc<Mutex<Counters>>, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let node = Arc::new(Fake { pushed: Mutex::new(Vec::new()), poked: Mutex::new(Vec::new()) });
        let (tx, rx) = watch::channel(false);
        let (counters, run) = serve(listener, Keys::derive(KEY).unwrap(), node.clone(), rx);
        tokio::spawn(run);
        (addr, node, counters, tx)
    }

    #[tokio::test]
    async fn pull_and_push_with_the_right_key() {
        let (addr, node, counters, _stop) = start().await;
        let client = Client::new(Keys::derive(KEY).unwrap(), Duration::from_secs(5));
        let (batch, traffic) = client.pull(addr, &json!({"a": 1})).await.unwrap();
        let batch: Value = serde_json::from_str(&batch).unwrap();
        assert!(traffic.sent > 0 && traffic.received > traffic.sent, "{traffic:?}");
        assert_eq!(batch["for"], json!({"a": 1}));
        assert_eq!(batch["events"][0]["data"]["name"], "Ada Lovelace");
        let out = client.push(addr, r#"{"events": []}"#).await.unwrap();
        assert_eq!(out["applied"], 1);
        assert_eq!(node.pushed.lock().unwrap().len(), 1);
        client.poke(addr, 9999).await.unwrap();
        assert_eq!(*node.poked.lock().unwrap(), vec!["127.0.0.1:9999".parse::<SocketAddr>().unwrap()]);
        assert_eq!(client.status(addr).await.unwrap()["name"], "fake");
        let (page, _) = client.snapshot(addr, &crate::snapshot::Ask::Manifest).await.unwrap();
        assert_eq!(serde_json::from_str::<Value>(&page).unwrap()["asked"], json!({"ask": "manifest"}));
        let ask = crate::verify::Ask::Values { table: "t".into(), keys: vec!["k".into()] };
        let (answer, _) = client.verify(addr, &ask).await.unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&answer).unwrap()["asked"],
            json!({"ask": "values", "table": "t", "keys": ["k"]})
        );
        assert_eq!(counters.lock().unwrap().rejected, BTreeMap::new());
        // /health needs no key and tells nothing secret.
        let health: Value = reqwest::get(format!("http://{addr}/health")).await.unwrap().json().await.unwrap();
        assert_eq!(health["status"], "ok");
        assert!(!health.to_string().contains("Ada"));
    }

    #[tokio::test]
    async fn wrong_key_replay_and_tampering_are_refused() {
        let (addr, node, counters, _stop) = start().await;
        let intruder = Client::new(Keys::derive("not the registration key").unwrap(), Duration::from_secs(5));
        assert!(matches!(intruder.pull(addr, &json!({})).await, Err(CallError::Refused(401))));
        assert!(matches!(intruder.push(addr, r#"{"events": []}"#).await, Err(CallError::Refused(401))));
        assert!(node.pushed.lock().unwrap().is_empty(), "nothing reached the node");

        // A recorded request, sent again byte for byte.
        let keys = Keys::derive(KEY).unwrap();
        let (sig, body) = wrap(&keys, "POST", "/v1/push", br#"{"events": []}"#);
        let http = reqwest::Client::new();
        let send = |sig: String, body: Vec<u8>| {
            http.post(format!("http://{addr}/v1/push")).header(SIGNATURE_HEADER, sig).body(body).send()
        };
        assert_eq!(send(sig.clone(), body.clone()).await.unwrap().status(), 200);
        assert_eq!(send(sig.clone(), body.clone()).await.unwrap().status(), 401);
        // A changed byte, a body moved to another path, no signature at all.
        let (sig2, mut body2) = wrap(&keys, "POST", "/v1/push", br#"{"events": []}"#);
        body2[30] ^= 1;
        assert_eq!(send(sig2, body2).await.unwrap().status(), 401);
        let (sig3, body3) = wrap(&keys, "POST", "/v1/changes", b"{}");
        assert_eq!(send(sig3, body3).await.unwrap().status(), 401);
        let bare = http.post(format!("http://{addr}/v1/push")).body("{}").send().await.unwrap();
        assert_eq!(bare.status(), 401);
        assert_eq!(node.pushed.lock().unwrap().len(), 1, "only the first, genuine push arrived");
        let c = counters.lock().unwrap().clone();
        assert_eq!(c.rejected.get("wrong_key"), Some(&4), "{c:?}");
        assert_eq!(c.rejected.get("replay"), Some(&1), "{c:?}");
        assert_eq!(c.rejected.get("malformed"), Some(&1), "{c:?}");
    }

    #[tokio::test]
    async fn bytes_on_the_wire_hold_no_plaintext() {
        let (addr, _node, _counters, _stop) = start().await;
        let keys = Keys::derive(KEY).unwrap();
        let (sig, body) = wrap(&keys, "POST", "/v1/changes", br#"{"some": "have"}"#);
        assert!(!String::from_utf8_lossy(&body).contains("have"));
        let resp = reqwest::Client::new()
            .post(format!("http://{addr}/v1/changes"))
            .header(SIGNATURE_HEADER, sig)
            .body(body)
            .send()
            .await
            .unwrap();
        let raw = resp.bytes().await.unwrap();
        for secret in ["Ada", "4111", "name", KEY] {
            assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} on the wire");
        }
    }
}
