//! A small client of etcd's v3 API, spoken through etcd's JSON gateway
//! (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/lease/*`, `/v3/watch`, ...).
//!
//! Why the gateway and not gRPC: the gRPC clients compile etcd's `.proto`
//! files at build time and so need `protoc` wherever torchrun-rs is built
//! (`cargo install`, the wheel, the README's first command); the gateway is
//! the same v3 API (same revisions, transactions, leases and watches) over
//! HTTP/JSON, served by every etcd since 3.4, and needs nothing but the
//! HTTP client (reqwest, with rustls for TLS). The cost: one HTTP stream per
//! watch instead of one multiplexed gRPC stream, which a rendezvous (two
//! watches per agent) does not notice.
//!
//! Keys and values are bytes; the gateway wants them base64 and returns
//! 64-bit numbers as strings, both handled here. Several endpoints are
//! tried in turn (failover); with a user name the client authenticates and
//! renews its token when etcd says it expired.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

pub use crate::config::rdzv_settings::EtcdOptions;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd refused the request: {0}")]
    Refused(String),
    #[error("etcd did not accept the credentials: {0}")]
    Auth(String),
    #[error("etcd's TLS settings: {0}")]
    Tls(String),
    #[error("the answer from {endpoint} is not etcd's v3 API ({what}); is that an etcd (3.4 or newer) client port?")]
    NotEtcd { endpoint: String, what: String },
    /// A watch started at a revision etcd has compacted away.
    #[error("the watch's start revision was compacted")]
    Compacted,
}

/// A key and what etcd knows of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// One change a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub deleted: bool,
    pub kv: Kv,
}

/// A transaction's outcome: which branch ran, at which revision, and each
/// operation's response (ranges only are decoded, by [`TxnResult::range`]).
#[derive(Debug)]
pub struct TxnResult {
    pub succeeded: bool,
    pub revision: i64,
    responses: Vec<Value>,
}

impl TxnResult {
    /// The keys the `i`-th operation (a range) returned.
    pub fn range(&self, i: usize) -> Vec<Kv> {
        self.responses
            .get(i)
            .and_then(|r| r.get("response_range"))
            .map(kvs)
            .unwrap_or_default()
    }
}

/// A transaction comparison or operation, as the gateway spells it.
pub mod op {
    use super::{b64, Value};
    use serde_json::json;

    /// `key`'s last modification was at `rev` (0: the key is absent).
    pub fn mod_revision_is(key: &[u8], rev: i64) -> Value {
        if rev == 0 {
            return json!({"target": "CREATE", "key": b64(key), "result": "EQUAL", "create_revision": "0"});
        }
        json!({"target": "MOD", "key": b64(key), "result": "EQUAL", "mod_revision": rev.to_string()})
    }

    pub fn put(key: &[u8], value: &[u8], lease: i64) -> Value {
        json!({"request_put": {"key": b64(key), "value": b64(value), "lease": lease.to_string()}})
    }

    pub fn get(key: &[u8]) -> Value {
        json!({"request_range": {"key": b64(key)}})
    }

    /// Every key under `prefix` modified after revision `after` (0: all);
    /// `keys_only` leaves the values out.
    pub fn prefix(prefix: &[u8], after: i64, keys_only: bool) -> Value {
        json!({"request_range": {
            "key": b64(prefix),
            "range_end": b64(&super::prefix_end(prefix)),
            "min_mod_revision": (after + 1).to_string(),
            "keys_only": keys_only,
        }})
    }
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The end of the range of keys that start with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from `prefix` on.
    vec![0]
}

/// The gateway writes 64-bit integers as strings and leaves zeros out.
fn num(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn bytes(v: Option<&Value>) -> Vec<u8> {
    v.and_then(Value::as_str)
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default()
}

fn kv(v: &Value) -> Kv {
    Kv {
        key: bytes(v.get("key")),
        value: bytes(v.get("value")),
        create_revision: num(v.get("create_revision")),
        mod_revision: num(v.get("mod_revision")),
    }
}

fn kvs(v: &Value) -> Vec<Kv> {
    v.get("kvs")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(kv).collect())
        .unwrap_or_default()
}

fn revision(v: &Value) -> i64 {
    num(v.get("header").and_then(|h| h.get("revision")))
}

/// An etcd error reply: `{"error": ..., "code": <gRPC code>, ...}`.
fn error_of(v: &Value) -> Option<(i64, String)> {
    let msg = v.get("error").or_else(|| v.get("message"))?;
    Some((
        num(v.get("code")),
        msg.as_str()
            .unwrap_or("?")
            .trim_start_matches("etcdserver: ")
            .to_string(),
    ))
}

const UNAUTHENTICATED: i64 = 16;
const UNAVAILABLE: i64 = 14;

pub struct Etcd {
    http: reqwest::Client,
    /// Base URLs (`http://host:port`).
    bases: Vec<String>,
    /// The endpoint that answered last: tried first.
    current: AtomicUsize,
    credentials: Option<(String, String)>,
    token: Mutex<Option<String>>,
    timeout: Duration,
}

impl Etcd {
    /// A client for `opts` (no request is sent yet: see [`Etcd::connect`]).
    pub fn new(opts: &EtcdOptions) -> Result<Etcd, EtcdError> {
        let scheme = if opts.https { "https" } else { "http" };
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(opts.timeout.min(Duration::from_secs(5)))
            .tcp_keepalive(Duration::from_secs(10))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60));
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| EtcdError::Tls(format!("cannot read {}: {e}", p.display())))
        };
        if let Some(ca) = &opts.ca_cert {
            let pem = read(ca)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| EtcdError::Tls(format!("{}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(EtcdError::Tls(format!(
                    "{}: no PEM certificate in it",
                    ca.display()
                )));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if let Some((cert, key)) = &opts.client_cert {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                EtcdError::Tls(format!("{} with {}: {e}", cert.display(), key.display()))
            })?;
            b = b.identity(id);
        }
        let http = b.build().map_err(|e| EtcdError::Tls(e.to_string()))?;
        Ok(Etcd {
            http,
            bases: opts
                .endpoints
                .iter()
                .map(|e| format!("{scheme}://{e}"))
                .collect(),
            current: AtomicUsize::new(0),
            credentials: opts
                .username
                .clone()
                .map(|u| (u, opts.password.clone().unwrap_or_default())),
            token: Mutex::new(None),
            timeout: opts.timeout,
        })
    }

    /// A client that has reached etcd (and logged in): retries until
    /// `opts.timeout`, then says which endpoints did not answer.
    pub async fn connect(opts: &EtcdOptions) -> Result<Etcd, EtcdError> {
        let etcd = Etcd::new(opts)?;
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            // The server's status: answered to any user, whatever keys
            // their role may read.
            match etcd.call("/v3/maintenance/status", &json!({})).await {
                Ok(_) => return Ok(etcd),
                Err(e @ EtcdError::Unreachable { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!("etcd not reachable yet: {e}");
                    let left = deadline - tokio::time::Instant::now();
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn endpoints(&self) -> String {
        self.bases.join(", ")
    }

    async fn authenticate(&self, base: &str) -> Result<(), EtcdError> {
        let Some((name, password)) = &self.credentials else {
            return Ok(());
        };
        let body = json!({"name": name, "password": password});
        let reply = self
            .send(base, "/v3/auth/authenticate", &body, None)
            .await
            .map_err(|reason| EtcdError::Unreachable {
                endpoints: base.to_string(),
                reason,
            })?;
        if let Some((_, msg)) = error_of(&reply) {
            return Err(EtcdError::Auth(format!("user {name:?}: {msg}")));
        }
        let token =
            reply
                .get("token")
                .and_then(Value::as_str)
                .ok_or_else(|| EtcdError::NotEtcd {
                    endpoint: base.to_string(),
                    what: "no token in the authentication reply".into(),
                })?;
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.to_string());
        Ok(())
    }

    fn auth_header(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// One POST; `Err` is a transport failure (try another endpoint).
    async fn send(
        &self,
        base: &str,
        path: &str,
        body: &Value,
        token: Option<String>,
    ) -> Result<Value, String> {
        let mut req = self
            .http
            .post(format!("{base}{path}"))
            .timeout(self.timeout)
            .json(body);
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let resp = req.send().await.map_err(describe)?;
        let status = resp.status();
        let text = resp.bytes().await.map_err(describe)?;
        serde_json::from_slice(&text).map_err(|_| {
            format!(
                "HTTP {status} with a body that is not JSON ({:?})",
                String::from_utf8_lossy(&text[..text.len().min(60)])
            )
        })
    }

    /// Sends `body` to `path` on the first endpoint that answers, logging
    /// in first (and again when the token expired). When none answers (a
    /// leader election, `UNAVAILABLE`; a restart of the only endpoint), the
    /// endpoints are tried again with backoff for up to `read_timeout`
    /// before the request fails: a blip of etcd must not end the job.
    ///
    /// A request sent again may have been applied the first time (its reply
    /// lost). Reads and puts are idempotent; a transaction's compare then
    /// fails on its own earlier write, and every caller of a transaction
    /// re-reads what it compared before deciding (see `run_lease`).
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.call_once(path, body).await {
                Err(e @ EtcdError::Unreachable { .. }) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(e);
                    }
                    tracing::debug!("etcd did not answer ({e}); trying again in {pause:?}");
                    tokio::time::sleep(pause.min(deadline - now)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// One pass over the endpoints.
    async fn call_once(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut reasons = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let base = &self.bases[idx];
            let mut renewed = false;
            loop {
                if self.credentials.is_some() && self.auth_header().is_none() {
                    match self.authenticate(base).await {
                        Ok(()) => {}
                        Err(EtcdError::Unreachable { reason, .. }) => {
                            reasons.push(format!("{base}: {reason}"));
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let reply = match self.send(base, path, body, self.auth_header()).await {
                    Ok(r) => r,
                    Err(reason) => {
                        reasons.push(format!("{base}: {reason}"));
                        break;
                    }
                };
                match error_of(&reply) {
                    None => {
                        self.current.store(idx, Ordering::Relaxed);
                        return Ok(reply);
                    }
                    Some((UNAUTHENTICATED, _)) if self.credentials.is_some() && !renewed => {
                        renewed = true;
                        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                    Some((UNAUTHENTICATED, msg)) => return Err(EtcdError::Auth(msg)),
                    Some((UNAVAILABLE, msg)) => {
                        reasons.push(format!("{base}: {msg}"));
                        break;
                    }
                    Some((_, msg))
                        if msg.contains("user name is empty")
                            || msg.contains("permission denied") =>
                    {
                        return Err(EtcdError::Auth(msg))
                    }
                    Some((_, msg)) => return Err(EtcdError::Refused(msg)),
                }
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints(),
            reason: reasons.join("; "),
        })
    }

    /// `key`'s current value (or every key under it with `prefix`), and
    /// the store's revision.
    pub async fn range(&self, key: &[u8], prefix: bool) -> Result<(Vec<Kv>, i64), EtcdError> {
        let mut body = json!({"key": b64(key)});
        if prefix {
            body["range_end"] = json!(b64(&prefix_end(key)));
        }
        let r = self.call("/v3/kv/range", &body).await?;
        Ok((kvs(&r), revision(&r)))
    }

    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let body = json!({"key": b64(key), "value": b64(value), "lease": lease.to_string()});
        Ok(revision(&self.call("/v3/kv/put", &body).await?))
    }

    pub async fn delete(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let body = json!({"key": b64(key)});
        Ok(revision(&self.call("/v3/kv/deleterange", &body).await?))
    }

    /// If every comparison holds, the `success` operations, else `failure`;
    /// atomically.
    pub async fn txn(
        &self,
        compare: Vec<Value>,
        success: Vec<Value>,
        failure: Vec<Value>,
    ) -> Result<TxnResult, EtcdError> {
        let body = json!({"compare": compare, "success": success, "failure": failure});
        let r = self.call("/v3/kv/txn", &body).await?;
        Ok(TxnResult {
            succeeded: r.get("succeeded").and_then(Value::as_bool).unwrap_or(false),
            revision: revision(&r),
            responses: r
                .get("responses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// A lease of `ttl` seconds: its id.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let r = self
            .call("/v3/lease/grant", &json!({"TTL": ttl.to_string()}))
            .await?;
        match num(r.get("ID")) {
            0 => Err(EtcdError::Refused("no lease id in the grant reply".into())),
            id => Ok(id),
        }
    }

    /// Renews a lease: its TTL, 0 if it has expired.
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, EtcdError> {
        let r = self
            .call("/v3/lease/keepalive", &json!({"ID": lease.to_string()}))
            .await?;
        Ok(num(r.get("result").and_then(|r| r.get("TTL"))))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": lease.to_string()}))
            .await
            .map(drop)
    }

    /// Watches `key` (every key from it up to `end`, excluded, with an
    /// end) from revision `start` (0: from now); `deletes_only` drops PUT
    /// events.
    pub async fn watch(
        &self,
        key: &[u8],
        end: Option<&[u8]>,
        start: i64,
        deletes_only: bool,
    ) -> Result<Watch, EtcdError> {
        let mut create = json!({"key": b64(key)});
        if let Some(end) = end {
            create["range_end"] = json!(b64(end));
        }
        if start > 0 {
            create["start_revision"] = json!(start.to_string());
        }
        if deletes_only {
            create["filters"] = json!(["NOPUT"]);
        }
        let body = json!({"create_request": create});
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut reasons = Vec::new();
        for i in 0..n {
            let base = &self.bases[(first + i) % n];
            if self.credentials.is_some() && self.auth_header().is_none() {
                if let Err(e) = self.authenticate(base).await {
                    reasons.push(format!("{base}: {e}"));
                    continue;
                }
            }
            let mut req = self.http.post(format!("{base}/v3/watch")).json(&body);
            if let Some(t) = self.auth_header() {
                req = req.header("Authorization", t);
            }
            match req.send().await {
                Ok(resp) => {
                    let mut w = Watch {
                        resp,
                        buf: Vec::new(),
                        endpoint: base.clone(),
                    };
                    // The first message says the watch was created (or why not).
                    match w.message().await? {
                        Some(m) if m.get("created").and_then(Value::as_bool) == Some(true) => {
                            return Ok(w)
                        }
                        Some(m) => {
                            if let Some(e) = w.error_in(&m) {
                                if matches!(e, EtcdError::Auth(_)) {
                                    *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
                                }
                                return Err(e);
                            }
                            return Ok(w);
                        }
                        None => reasons.push(format!("{base}: the watch stream ended at once")),
                    }
                }
                Err(e) => reasons.push(format!("{base}: {}", describe(e))),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints(),
            reason: reasons.join("; "),
        })
    }
}

/// A reqwest error in a few words, with its cause (the connect error, say).
fn describe(e: reqwest::Error) -> String {
    use std::error::Error;
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        e.to_string()
    };
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(&format!(": {s}"));
        src = s.source();
    }
    out
}

/// An open watch: batches of events, in revision order.
pub struct Watch {
    resp: reqwest::Response,
    buf: Vec<u8>,
    endpoint: String,
}

/// What a watch delivers: events, in revision order.
#[derive(Debug)]
pub struct WatchBatch {
    pub events: Vec<Event>,
}

impl Watch {
    /// The next JSON message of the stream (`None`: the stream ended).
    async fn message(&mut self) -> Result<Option<Value>, EtcdError> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    self.buf.drain(..used);
                    return Ok(Some(v.get("result").cloned().unwrap_or(v)));
                }
                Some(Err(e)) if !e.is_eof() => {
                    return Err(EtcdError::NotEtcd {
                        endpoint: self.endpoint.clone(),
                        what: format!("watch stream: {e}"),
                    })
                }
                _ => {}
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(EtcdError::Unreachable {
                        endpoints: self.endpoint.clone(),
                        reason: describe(e),
                    })
                }
            }
        }
    }

    fn error_in(&self, m: &Value) -> Option<EtcdError> {
        if num(m.get("compact_revision")) > 0 {
            return Some(EtcdError::Compacted);
        }
        if let Some((code, msg)) = error_of(m) {
            return Some(if code == UNAUTHENTICATED {
                EtcdError::Auth(msg)
            } else {
                EtcdError::Refused(msg)
            });
        }
        if m.get("canceled").and_then(Value::as_bool) == Some(true) {
            let why = m
                .get("cancel_reason")
                .and_then(Value::as_str)
                .unwrap_or("canceled");
            return Some(EtcdError::Refused(format!("watch canceled: {why}")));
        }
        None
    }

    /// The next batch of events (`None`: the stream ended, e.g. etcd went
    /// away). Progress messages without events are skipped.
    pub async fn next(&mut self) -> Result<Option<WatchBatch>, EtcdError> {
        loop {
            let Some(m) = self.message().await? else {
                return Ok(None);
            };
            if let Some(e) = self.error_in(&m) {
                return Err(e);
            }
            let events: Vec<Event> = m
                .get("events")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|e| Event {
                            deleted: e.get("type").and_then(Value::as_str) == Some("DELETE"),
                            kv: e.get("kv").map(kv).unwrap_or_default(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            if !events.is_empty() {
                return Ok(Some(WatchBatch { events }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn gateway_numbers_and_bytes() {
        let v = json!({"header": {"revision": "42"}, "kvs": [{"key": "Zm9v", "value": "YmFy", "mod_revision": "7"}]});
        assert_eq!(revision(&v), 42);
        let k = &kvs(&v)[0];
        assert_eq!(
            (
                k.key.as_slice(),
                k.value.as_slice(),
                k.mod_revision,
                k.create_revision
            ),
            (&b"foo"[..], &b"bar"[..], 7, 0)
        );
        assert_eq!(
            error_of(&json!({"error": "etcdserver: permission denied", "code": 7})),
            Some((7, "permission denied".to_string()))
        );
    }
}
