//! `--metrics-addr`: the node's event stream as OpenMetrics text, for
//! operators who run headless nodes under Prometheus.
//!
//! It is a third renderer of the same `NodeEvent`s the log and the desktop
//! app show, so the numbers cannot disagree. The exposition format and HTTP
//! are left to `prometheus-client` and `hyper` because both are easy to get
//! subtly wrong by hand (escaping, suffixes, request parsing, keep-alive),
//! and a scraper that cannot parse us is as bad as no metrics at all.
//!
//! A metrics port must never be a way to hurt the node: one route, a small
//! request buffer, no keep-alive, and deadlines on reading the request and on
//! the whole connection, so a slow or silent client cannot hold a task or the
//! port for long. Gauges only appear once their value is known (a labelled
//! child is created on first value), because a made-up zero loss or cap would
//! be read as a real one.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::events::{NodeEvent, NodeState};

/// The content type of an OpenMetrics 1.0 text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Largest request head read from a scraper (hyper's minimum buffer size).
const MAX_REQUEST: usize = 8 * 1024;

/// How long a scraper may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection may live, reading the response included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// The one label every sample carries.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

type Counters = Family<NodeLabel, Counter>;
type IntGauges = Family<NodeLabel, Gauge<u64, AtomicU64>>;
type FloatGauges = Family<NodeLabel, Gauge<f64, AtomicU64>>;

/// Counters and gauges per node, fed from events.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Held while an event is folded in and while rendering, so a scrape
    /// sees whole events (a round's counters and gauges together).
    apply: Mutex<()>,
    round: IntGauges,
    rounds_applied: Counters,
    updates_applied: Counters,
    bytes_sent: Counters,
    bytes_received: Counters,
    tokens_trained: Counters,
    run_tokens: IntGauges,
    loss: FloatGauges,
    eval_loss: FloatGauges,
    rejected: Counters,
    dropped: Counters,
    diverged: Counters,
    upload_cap_mbit: FloatGauges,
    download_cap_mbit: FloatGauges,
    month_bytes: IntGauges,
    monthly_cap_bytes: IntGauges,
    paused: IntGauges,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("starling"),
            apply: Mutex::new(()),
            round: Family::default(),
            rounds_applied: Family::default(),
            updates_applied: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            tokens_trained: Family::default(),
            run_tokens: Family::default(),
            loss: Family::default(),
            eval_loss: Family::default(),
            rejected: Family::default(),
            dropped: Family::default(),
            diverged: Family::default(),
            upload_cap_mbit: Family::default(),
            download_cap_mbit: Family::default(),
            month_bytes: Family::default(),
            monthly_cap_bytes: Family::default(),
            paused: Family::default(),
        };
        // The registry appends the full stop itself.
        let r = &mut metrics.registry;
        r.register("round", "Last round applied", metrics.round.clone());
        r.register(
            "rounds_applied",
            "Rounds applied",
            metrics.rounds_applied.clone(),
        );
        r.register(
            "updates_applied",
            "Peer updates applied",
            metrics.updates_applied.clone(),
        );
        r.register(
            "bytes_sent",
            "Bytes sent (blob traffic)",
            metrics.bytes_sent.clone(),
        );
        r.register(
            "bytes_received",
            "Bytes received (blob traffic)",
            metrics.bytes_received.clone(),
        );
        r.register(
            "tokens_trained",
            "Tokens this node trained on",
            metrics.tokens_trained.clone(),
        );
        r.register(
            "run_tokens",
            "Tokens the whole run has trained on (from the coordinator's last manifest)",
            metrics.run_tokens.clone(),
        );
        r.register(
            "loss",
            "Mean training loss of the last applied round",
            metrics.loss.clone(),
        );
        r.register("eval_loss", "Last held-out loss", metrics.eval_loss.clone());
        r.register(
            "rejected",
            "Updates or messages refused",
            metrics.rejected.clone(),
        );
        r.register(
            "dropped",
            "Members removed after repeated faults",
            metrics.dropped.clone(),
        );
        r.register(
            "diverged",
            "Weight digests that disagreed",
            metrics.diverged.clone(),
        );
        r.register(
            "upload_cap_mbit",
            "Upload cap in Mbit/s (absent: unlimited)",
            metrics.upload_cap_mbit.clone(),
        );
        r.register(
            "download_cap_mbit",
            "Download cap in Mbit/s (absent: unlimited)",
            metrics.download_cap_mbit.clone(),
        );
        r.register(
            "month_bytes",
            "Bytes moved this calendar month",
            metrics.month_bytes.clone(),
        );
        r.register(
            "monthly_cap_bytes",
            "Monthly data cap",
            metrics.monthly_cap_bytes.clone(),
        );
        r.register(
            "paused",
            "1 while participation is paused",
            metrics.paused.clone(),
        );
        metrics
    }
}

/// Set a gauge that is absent while unknown: `None` removes the sample.
fn set_or_remove<T>(family: &Family<NodeLabel, Gauge<T, AtomicU64>>, l: &NodeLabel, v: Option<T>)
where
    AtomicU64: prometheus_client::metrics::gauge::Atomic<T>,
{
    match v {
        Some(v) => {
            family.get_or_create(l).set(v);
        }
        None => {
            family.remove(l);
        }
    }
}

impl Metrics {
    /// Fold one event into the numbers.
    pub fn observe(&self, event: &NodeEvent) {
        let _apply = self.apply.lock().unwrap_or_else(|e| e.into_inner());
        let node = match event {
            NodeEvent::State { node, .. }
            | NodeEvent::Joined { node, .. }
            | NodeEvent::RoundOpened { node, .. }
            | NodeEvent::Trained { node, .. }
            | NodeEvent::RoundApplied { node, .. }
            | NodeEvent::Rejected { node, .. }
            | NodeEvent::SpotChecked { node, .. }
            | NodeEvent::Dropped { node, .. }
            | NodeEvent::Diverged { node, .. }
            | NodeEvent::Evaluated { node, .. }
            | NodeEvent::Fetching { node, .. }
            | NodeEvent::Peers { node, .. }
            | NodeEvent::Checkpoint { node, .. }
            | NodeEvent::Usage { node, .. }
            | NodeEvent::Warning { node, .. }
            | NodeEvent::Caps { node, .. } => node,
        };
        let l = NodeLabel { node: node.clone() };
        // Counters exist (at zero) from a node's first event on.
        let counters = [
            &self.rounds_applied,
            &self.updates_applied,
            &self.bytes_sent,
            &self.bytes_received,
            &self.tokens_trained,
            &self.rejected,
            &self.dropped,
            &self.diverged,
        ];
        for family in counters {
            drop(family.get_or_create(&l));
        }
        match event {
            NodeEvent::State { state, .. } => {
                self.paused
                    .get_or_create(&l)
                    .set(u64::from(*state == NodeState::Paused));
            }
            NodeEvent::Trained { tokens, .. } => {
                self.tokens_trained.get_or_create(&l).inc_by(*tokens);
            }
            NodeEvent::RoundApplied {
                round,
                updates,
                loss,
                eval_loss,
                bytes_up,
                bytes_down,
                run_tokens,
                ..
            } => {
                self.round.get_or_create(&l).set(*round);
                self.run_tokens.get_or_create(&l).set(*run_tokens);
                self.rounds_applied.get_or_create(&l).inc();
                self.updates_applied
                    .get_or_create(&l)
                    .inc_by(u64::try_from(*updates).unwrap_or(u64::MAX));
                self.bytes_sent.get_or_create(&l).inc_by(*bytes_up);
                self.bytes_received.get_or_create(&l).inc_by(*bytes_down);
                // A round without a loss keeps the last one known.
                if let Some(loss) = loss {
                    self.loss.get_or_create(&l).set(f64::from(*loss));
                }
                if let Some(eval_loss) = eval_loss {
                    self.eval_loss.get_or_create(&l).set(f64::from(*eval_loss));
                }
            }
            NodeEvent::Rejected { .. } => {
                self.rejected.get_or_create(&l).inc();
            }
            NodeEvent::Dropped { .. } => {
                self.dropped.get_or_create(&l).inc();
            }
            NodeEvent::Diverged { .. } => {
                self.diverged.get_or_create(&l).inc();
            }
            NodeEvent::Evaluated { eval_loss, .. } => {
                self.eval_loss.get_or_create(&l).set(f64::from(*eval_loss));
            }
            NodeEvent::Usage { up, down, cap, .. } => {
                self.month_bytes
                    .get_or_create(&l)
                    .set(up.saturating_add(*down));
                set_or_remove(&self.monthly_cap_bytes, &l, *cap);
            }
            NodeEvent::Caps {
                up_mbit, down_mbit, ..
            } => {
                set_or_remove(&self.upload_cap_mbit, &l, *up_mbit);
                set_or_remove(&self.download_cap_mbit, &l, *down_mbit);
            }
            _ => {}
        }
    }

    /// The OpenMetrics exposition.
    pub fn render(&self) -> String {
        let _apply = self.apply.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            // Writing into a String cannot fail; keep the scrape well-formed
            // even so.
            tracing::warn!("encoding metrics failed: {e}");
            out.clear();
            out.push_str("# EOF\n");
        }
        out
    }
}

/// Answer `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    serve_with(listener, metrics, HEADER_TIMEOUT, CONNECTION_TIMEOUT).await;
}

async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    header_timeout: Duration,
    connection_timeout: Duration,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_REQUEST)
        .keep_alive(false);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Mostly out of file descriptors: back off instead of spinning.
                tracing::debug!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            }),
        );
        tokio::spawn(async move {
            match tokio::time::timeout(connection_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics connection: {e}"),
                Err(_) => tracing::debug!("metrics connection timed out"),
            }
        });
    }
}

/// The one route.
fn answer(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let text = |status, body: &'static str| {
        let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *res.status_mut() = status;
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    };
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "try /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    let mut res = Response::new(Full::new(Bytes::from(metrics.render())));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    res
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn round(node: &str, round: u64, loss: Option<f32>, eval_loss: Option<f32>) -> NodeEvent {
        NodeEvent::RoundApplied {
            node: node.into(),
            round,
            updates: 3,
            loss,
            eval_loss,
            digest: round,
            bytes_up: if round == 4 { 100 } else { 10 },
            bytes_down: if round == 4 { 200 } else { 20 },
            allreduce_bytes: 4000,
            tokens: 256,
            run_tokens: 256 * (round + 1),
        }
    }

    /// Send raw bytes, read until the server closes.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    async fn get(addr: SocketAddr, method: &str, path: &str) -> String {
        raw(
            addr,
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await
    }

    #[tokio::test]
    async fn events_become_openmetrics_over_http() {
        let metrics = Arc::new(Metrics::default());
        metrics.observe(&round("n1", 4, Some(2.5), None));
        metrics.observe(&round("n1", 5, None, Some(2.25)));
        let text = metrics.render();
        assert!(text.contains("starling_round{node=\"n1\"} 5\n"), "{text}");
        assert!(
            text.contains("starling_bytes_sent_total{node=\"n1\"} 110\n"),
            "{text}"
        );
        assert!(
            text.contains("starling_updates_applied_total{node=\"n1\"} 6\n"),
            "{text}"
        );
        assert!(text.contains("starling_loss{node=\"n1\"} 2.5\n"), "{text}");
        assert!(
            text.contains("starling_run_tokens{node=\"n1\"} 1536\n"),
            "{text}"
        );
        assert!(
            text.contains("starling_eval_loss{node=\"n1\"} 2.25\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE starling_rounds_applied counter\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP starling_run_tokens Tokens the whole run has trained on \
                 (from the coordinator's last manifest).\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics));
        let ok = get(addr, "GET", "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.to_ascii_lowercase()
                .contains(&format!("content-type: {OPENMETRICS}\r\n")),
            "{ok}"
        );
        assert!(
            ok.contains("starling_bytes_received_total{node=\"n1\"} 220"),
            "{ok}"
        );
        assert!(ok.ends_with("# EOF\n"), "{ok}");

        let other = get(addr, "GET", "/").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = get(addr, "POST", "/metrics").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let garbage = raw(addr, b"NOT HTTP AT ALL\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        assert!(!garbage.contains("starling_"), "{garbage}");
        let huge = raw(
            addr,
            format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(2 * MAX_REQUEST)
            )
            .as_bytes(),
        )
        .await;
        assert!(!huge.contains("starling_"), "{huge}");
        server.abort();
    }

    #[tokio::test]
    async fn other_paths_are_not_found() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Metrics::default())));
        for path in ["/", "/metricsx", "/metrics/", "/favicon.ico"] {
            let res = get(addr, "GET", path).await;
            assert!(
                res.starts_with("HTTP/1.1 404 Not Found\r\n"),
                "{path}: {res}"
            );
            assert!(!res.contains("# EOF"), "{path}: {res}");
        }
        server.abort();
    }

    #[test]
    fn unknown_gauges_stay_absent() {
        let metrics = Metrics::default();
        assert_eq!(metrics.render(), "# EOF\n");

        metrics.observe(&NodeEvent::State {
            node: "n1".into(),
            state: NodeState::Paused,
            detail: String::new(),
        });
        let text = metrics.render();
        assert!(text.contains("starling_paused{node=\"n1\"} 1\n"), "{text}");
        assert!(
            text.contains("starling_rounds_applied_total{node=\"n1\"} 0\n"),
            "{text}"
        );
        for absent in [
            "starling_round",
            "starling_loss",
            "starling_eval_loss",
            "starling_run_tokens",
            "starling_upload_cap_mbit",
            "starling_month_bytes",
        ] {
            assert!(!text.contains(&format!("{absent}{{")), "{absent}: {text}");
            assert!(!text.contains(&format!("{absent} ")), "{absent}: {text}");
        }

        metrics.observe(&NodeEvent::Caps {
            node: "n1".into(),
            up_mbit: Some(8.0),
            down_mbit: None,
        });
        let text = metrics.render();
        assert!(
            text.contains("starling_upload_cap_mbit{node=\"n1\"} 8"),
            "{text}"
        );
        assert!(!text.contains("starling_download_cap_mbit"), "{text}");

        // Back to unlimited: the sample goes away again.
        metrics.observe(&NodeEvent::Caps {
            node: "n1".into(),
            up_mbit: None,
            down_mbit: None,
        });
        assert!(!metrics.render().contains("starling_upload_cap_mbit"));
    }

    #[tokio::test]
    async fn silent_clients_are_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_with(
            listener,
            Arc::new(Metrics::default()),
            Duration::from_millis(200),
            Duration::from_secs(5),
        ));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let mut out = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
        assert!(closed.is_ok(), "connection still open");
        server.abort();
    }
}
